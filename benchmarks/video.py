"""Temporal coherence of stylised clips: independent frames against Ruder et al.'s temporal mode.

Makes a short clip from a bundled public-domain image (a slow pan with a zoom, written as an mp4, so
nothing large is committed), stylises it twice through ``nst_lightning.fit_clip`` - frames independent
(``video.temporal_weight=0``, ``video.init=content``) and temporal (the defaults: warped init and the
temporal loss) - and prints, per mode:

- warping error: mean |S_t - warp(S_{t-1})| (8-bit units) over the pixels the previous frame covers,
  warped by the EXACT flow of the generated camera motion (not the flow the method estimates);
- judged style and content per frame (``nst_lightning.judge``, mean over frames; lower is better);
- seconds per frame (whole clip, flow and video IO included).

    python benchmarks/video.py                                      # 24 frames, 256x192 px, 10 steps a frame
    python benchmarks/video.py --gif docs/video_side_by_side.gif    # also the independent | temporal GIF
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from nst_lightning.config import EXAMPLE_CONTENT, EXAMPLE_STYLE, load_config
from nst_lightning.flow import warp
from nst_lightning.images import read_image
from nst_lightning.judge import Judge
from nst_lightning import fit_clip
from nst_lightning.videoio import write_video


@dataclass(frozen=True)
class Camera:
    """A crop window per frame in source pixels: left, top, width (height follows the aspect)."""

    windows: list[tuple[float, float, float]]
    width: int
    height: int

    def source_point(self, t: int, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where pixel centres ``(u, v)`` of frame ``t`` come from in the source image."""
        left, top, w = self.windows[t]
        scale = w / self.width
        return left + (u + 0.5) * scale, top + (v + 0.5) * scale

    def flow(self, t: int, s: int) -> torch.Tensor:
        """The exact ``(1, 2, H, W)`` flow from frame ``t`` to frame ``s``."""
        v, u = torch.meshgrid(torch.arange(self.height, dtype=torch.float32), torch.arange(self.width, dtype=torch.float32), indexing="ij")
        x, y = self.source_point(t, u, v)
        left, top, w = self.windows[s]
        scale = self.width / w
        return torch.stack([(x - left) * scale - 0.5 - u, (y - top) * scale - 0.5 - v]).unsqueeze(0)


def make_clip(path: Path, frames: int, width: int, fps: int) -> Camera:
    """A slow diagonal pan with a 15% zoom-in over the bundled astronaut photograph, written as an mp4."""
    source = Image.open(EXAMPLE_CONTENT).convert("RGB")
    sw, sh = source.size
    height = width * 3 // 4
    windows = []
    for t in range(frames):
        a = t / max(1, frames - 1)
        w = sw * (0.72 - 0.11 * a)
        windows.append((sw * 0.04 + a * sw * 0.16, sh * 0.02 + a * sh * 0.10, w))
    camera = Camera(windows, width, height)
    folder = path.parent / "source_frames"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for t, (left, top, w) in enumerate(windows):
        box = (left, top, left + w, top + w * height / width)
        files.append(folder / f"{t:04d}.png")
        source.resize((width, height), Image.Resampling.LANCZOS, box=box).save(files[-1])
    write_video(files, path, fps)
    return camera


@dataclass
class Result:
    mode: str
    seconds_per_frame: float
    warping_error: float
    style: float
    content: float
    style_sw: float
    frames: list[torch.Tensor]


def warping_error(frames: list[torch.Tensor], camera: Camera) -> float:
    """Mean |S_t - warp(S_{t-1})| in 8-bit units over the pixels of frame t that frame t-1 shows."""
    total, count = 0.0, 0.0
    for t in range(1, len(frames)):
        flow = camera.flow(t, t - 1)
        _, _, h, w = flow.shape
        v, u = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        x, y = u + flow[0, 0], v + flow[0, 1]
        inside = ((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)).float()
        diff = (frames[t] - warp(frames[t - 1], flow)).abs().mean(dim=1)[0] * 255.0
        total += float((diff * inside).sum())
        count += float(inside.sum())
    return total / count


def stylise(mode: str, clip: Path, out: Path, args: argparse.Namespace, camera: Camera, judge: Judge) -> Result:
    video = ["video.temporal_weight=0", "video.init=content"] if mode == "independent" else [f"video.temporal_weight={args.temporal_weight}"]
    config = load_config(
        None,
        [
            f"content={clip}",
            f"style={EXAMPLE_STYLE}",
            f"output={out / mode}",
            f"image.size={args.size}",
            f"trainer.max_steps={args.steps}",
            *(f"video.{item}" if not item.startswith("video.") else item for item in video),
        ],
    )
    start = time.perf_counter()
    outputs = fit_clip(config, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    frames = [read_image(p) for p in sorted(outputs.frames.glob("*.png"))]
    contents = [read_image(p) for p in sorted((clip.parent / "source_frames").glob("*.png"))]
    style = read_image(EXAMPLE_STYLE)
    scores = [judge(f, c, style) for f, c in zip(frames, contents)]
    return Result(
        mode,
        seconds / len(frames),
        warping_error(frames, camera),
        float(np.mean([s.style for s in scores])),
        float(np.mean([s.content for s in scores])),
        float(np.mean([s.style_sw for s in scores])),
        frames,
    )


def save_gif(path: Path, left: list[torch.Tensor], right: list[torch.Tensor], fps: int) -> None:
    """Side-by-side frames, independent | temporal, labelled, looping."""
    pictures = []
    for a, b in zip(left, right):
        pair = torch.cat([a, b], dim=-1)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        image = Image.fromarray(pair)
        draw = ImageDraw.Draw(image)
        width = a.shape[-1]
        for x, text in ((4, "independent"), (width + 4, "temporal")):
            draw.text((x + 1, 3), text, fill=(0, 0, 0))
            draw.text((x, 2), text, fill=(255, 255, 255))
        pictures.append(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=255))
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=round(1000 / fps), loop=0, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=256, help="frame width in px (height is 3/4 of it)")
    parser.add_argument("--steps", type=int, default=10, help="L-BFGS steps per frame")
    parser.add_argument("--fps", type=int, default=12)
    parser.add_argument("--temporal-weight", type=float, default=None, help="default: the config's video.temporal_weight")
    parser.add_argument("--gif", type=Path, default=None, help="write the independent | temporal GIF here")
    parser.add_argument("--work", type=Path, default=None, help="keep the clips and runs here (default: a temporary folder)")
    args = parser.parse_args()
    if args.temporal_weight is None:
        args.temporal_weight = load_config(None, []).video.temporal_weight
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        clip = work / "clip.mp4"
        camera = make_clip(clip, args.frames, args.size, args.fps)
        judge = Judge()
        results = [stylise(mode, clip, work / "runs", args, camera, judge) for mode in ("independent", "temporal")]
        contents = [read_image(p) for p in sorted((work / "source_frames").glob("*.png"))]
        floor = warping_error(contents, camera)
        if args.gif is not None:
            save_gif(args.gif, results[0].frames, results[1].frames, args.fps)
    print(
        f"clip: {args.frames} frames, {args.size}x{args.size * 3 // 4} px, {args.fps} fps, pan + zoom over astronaut.jpg; "
        f"style starry_night.jpg; {args.steps} L-BFGS steps per frame; temporal_weight {args.temporal_weight:g}; "
        f"threads {torch.get_num_threads()}"
    )
    print("\n| mode | warping error (8-bit) | judged style | judged style (sw) | judged content | s/frame |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.mode} | {r.warping_error:.2f} | {r.style:.4f} | {r.style_sw:.4f} | {r.content:.4f} | {r.seconds_per_frame:.2f} |")
    print(f"| content frames (resampling floor) | {floor:.2f} | | | |")
    ind, tem = results
    print(
        f"\nwarping error {ind.warping_error / tem.warping_error:.1f}x lower in temporal mode (target >= 3x); "
        f"judged style {100 * (tem.style / ind.style - 1):+.1f}% (target <= +10%); "
        f"content {100 * (tem.content / ind.content - 1):+.1f}%"
    )
    if args.gif is not None:
        print(f"wrote {args.gif} ({args.gif.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
