"""Clips end to end: video or frames in, frames and an mp4 out, resume, temporal coherence, bad clips refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from typer.testing import CliRunner

from nst_lightning.cli import app
from nst_lightning.config import EXAMPLE_CONTENT, load_config
from nst_lightning.errors import CheckpointError, ConfigError, RunInterrupted
from nst_lightning.images import load_image, read_image

from .conftest import ROOT, tiny_overrides

av = pytest.importorskip("av")
pytest.importorskip("cv2")

from nst_lightning.flow import flow_and_weights, warping_error  # noqa: E402
from nst_lightning import fit_clip  # noqa: E402
from nst_lightning.videoio import read_clip, video_info  # noqa: E402

STEPS = 3


def pan(count: int, width: int = 64, height: int = 48, step: int = 2) -> list[np.ndarray]:
    """``count`` frames of a photograph panned ``step`` px right per frame, as 8-bit RGB arrays."""
    image = load_image(EXAMPLE_CONTENT, 128)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
    return [np.ascontiguousarray(image[20 : 20 + height, 10 + step * t : 10 + step * t + width]) for t in range(count)]


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 12, times_ms: list[int] | None = None, audio: bool = False) -> Path:
    """An H.264 mp4 of ``frames``; ``times_ms`` gives each frame's time (a variable rate), ``audio`` adds a sound track."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if times_ms is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        sound = container.add_stream("aac", rate=8000) if audio else None
        for t, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[t], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if sound is not None:
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 8000, 0
            container.mux(sound.encode(samples))
            container.mux(sound.encode())
    return path


def clip_config(content: Path | str, output: Path, **extra: object):
    return load_config(None, tiny_overrides(output, steps=STEPS, **{"content": content, "trainer.precision": "32-true", **extra}))


def test_a_video_becomes_an_mp4_and_frames_at_its_rate_and_the_asked_size(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", pan(5), fps=12, audio=True)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    items = tiny_overrides(out, steps=2, content=clip, **{"trainer.precision": "32-true"})
    args = [a for item in items for a in ("--set", item)]
    r = subprocess.run([sys.executable, "-m", "nst_lightning", "fit", "-q", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out / 'stylised.mp4'} and 5 frames in {out / 'frames'}" in r.stdout
    assert "audio" in r.stderr and "dropped" in r.stderr
    assert sorted(p.name for p in (out / "frames").iterdir()) == [f"{i:06d}.png" for i in range(1, 6)]
    assert Image.open(out / "frames" / "000003.png").size == (48, 36)
    assert video_info(out / "stylised.mp4") == (5, Fraction(12), (36, 48))


def test_frames_are_a_clip_with_video_enabled_at_video_fps_and_every_nth_frame(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, array in enumerate(pan(6)):
        Image.fromarray(array).save(folder / f"f{t:02d}.png")
    config = load_config(None, [f"content={folder}", "video.enabled=true", "video.fps=10", "video.every_nth_frame=2", "image.size=32"])
    clip = read_clip(config.contents, 32, "long", config.video.every_nth_frame, config.video.fps)
    assert len(clip) == 3 and clip.fps == Fraction(5) and clip.shape == (24, 32)
    assert torch.allclose(clip.frame(1), load_image(folder / "f02.png", 32), atol=1 / 255 + 1e-6)
    video = read_clip([str(write_clip(tmp_path / "c.mp4", pan(6), fps=12))], 32, every_nth=3)
    assert len(video) == 2 and video.fps == Fraction(4)


class _SeenImages(Callback):
    """Keeps the content and first style image of every frame's module as its fit starts."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen.append((pl_module.content_image.cpu(), pl_module.style_images[0][0].cpu()))


def test_a_clip_loads_frames_and_styles_as_the_image_section_says(tmp_path):
    from nst_lightning.config import EXAMPLE_STYLE
    from nst_lightning.images import Loading, load_style

    folder = tmp_path / "frames"
    folder.mkdir()
    for t, array in enumerate(pan(2)):
        Image.fromarray(array).save(folder / f"f{t:02d}.png")
    loading = Loading(resample="nearest", style_fit="stretch")
    images = _SeenImages()
    config = clip_config(
        folder, tmp_path / "out",
        **{"trainer.max_steps": 1, "video.enabled": "true", "image.resample": "nearest", "image.style_fit": "stretch", "style": EXAMPLE_STYLE},
    )
    fit_clip(config, progress=False, callbacks=[images])
    content, style = images.seen[0]
    assert tuple(style.shape[-2:]) == tuple(content.shape[-2:])  # stretched to the frame, not kept in proportion
    torch.testing.assert_close(style, load_style(EXAMPLE_STYLE, tuple(content.shape[-2:]), 1.0, loading))
    nearest = load_image(folder / "f00.png", config.image.size, "long", loading)
    bicubic = load_image(folder / "f00.png", config.image.size, "long")
    assert (content - nearest).abs().max() <= 1 / 255 + 1e-6 < (content - bicubic).abs().max()


class _SignalAtFrame(Callback):
    """Sends SIGINT to this process during the first step of the ``frame``-th frame it sees (1-based)."""

    def __init__(self, frame: int) -> None:
        self.frame, self.seen = frame, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.frame and trainer.global_step == 0:
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_clip_resumes_at_its_first_unfinished_frame(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", pan(4))
    out = tmp_path / "out"
    config = clip_config(clip, out)
    with pytest.raises(RunInterrupted, match="frame 3/4"):
        fit_clip(config, progress=False, callbacks=[_SignalAtFrame(3)])
    frames = out / "frames"
    assert sorted(p.name for p in frames.iterdir()) == ["000001.png", "000002.png"]
    assert not (out / "stylised.mp4").exists()
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in frames.iterdir()}
    with pytest.raises(ConfigError, match="previous run"):
        fit_clip(config, progress=False)
    with pytest.raises(CheckpointError, match="settings"):
        fit_clip(clip_config(clip, out, **{"loss.style_weight": 3}), resume="last", progress=False)

    starts = _Starts()
    fit_clip(config, resume="last", progress=False, callbacks=[starts])
    assert starts.count == 2  # frames 3 and 4 only
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in frames.iterdir() if p.name in kept} == kept
    assert sorted(p.name for p in frames.iterdir()) == [f"{i:06d}.png" for i in range(1, 5)]
    assert video_info(out / "stylised.mp4")[0] == 4


class _Starts(Callback):
    """Counts the frames optimised."""

    def __init__(self) -> None:
        self.count = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.count += 1


def test_two_passes_go_forward_then_back_and_a_finished_clip_resumes_to_nothing(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", pan(3))
    config = clip_config(clip, tmp_path / "out", **{"video.passes": 2, "trainer.max_steps": 2})
    starts = _Starts()
    fit_clip(config, progress=False, callbacks=[starts])
    assert starts.count == 6
    first = sorted((tmp_path / "out" / "passes" / "pass1").glob("*.png"))
    final = sorted((tmp_path / "out" / "frames").glob("*.png"))
    assert [p.name for p in first] == [p.name for p in final] == ["000001.png", "000002.png", "000003.png"]
    assert not torch.equal(read_image(first[0]), read_image(final[0]))  # the second pass changed the frames
    again = _Starts()
    fit_clip(config, resume="last", progress=False, callbacks=[again])
    assert again.count == 0 and video_info(tmp_path / "out" / "stylised.mp4")[0] == 3


def _clip_warping_error(clip: Path, frames: Path) -> float:
    """Mean warping error of the stylised frames, warped by the flow of the content frames."""
    contents = read_clip([str(clip)], 48)
    results = [read_image(p) for p in sorted(frames.glob("*.png"))]
    errors = []
    for t in range(1, len(results)):
        flow, weights = flow_and_weights(contents.frame(t), contents.frame(t - 1))
        errors.append(warping_error(results[t], results[t - 1], flow, weights))
    return float(np.mean(errors))


def test_the_temporal_term_makes_frames_follow_the_motion(tmp_path):
    """Same steps from the same start: the term alone, and with the warped start, cut the flicker of independent frames.

    12 steps: the default, preconditioned L-BFGS first moves every frame's low frequencies, and the term alone only
    takes hold after that (flicker 0.90 of the independent frames' at step 8, 0.22 at 12; plain L-BFGS 0.27 at 8)."""
    clip = write_clip(tmp_path / "clip.mp4", pan(4, step=3))
    runs = {
        "independent": {"video.temporal_weight": 0, "video.init": "content"},
        "term": {"video.init": "content"},
        "temporal": {},
    }
    error = {}
    for name, extra in runs.items():
        fit_clip(clip_config(clip, tmp_path / name, **{"trainer.max_steps": 12, **extra}), progress=False)
        error[name] = _clip_warping_error(clip, tmp_path / name / "frames")
    assert error["term"] < 0.5 * error["independent"], error
    assert error["temporal"] < 0.5 * error["independent"], error


class _Tiles(Callback):
    """The tile side each optimised frame evaluates with."""

    def __init__(self) -> None:
        self.tiles: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.tiles.append(pl_module.tile)


def test_a_tiled_clip_writes_the_frames_an_untiled_one_writes(tmp_path):
    """Clips refused features.tile; now every frame, its temporal term included, is evaluated tile by tile."""
    clip = write_clip(tmp_path / "clip.mp4", pan(3, 96, 64))
    shallow = {"loss.content_layers": "[relu3_1]", "loss.style_layers": "[relu1_1, relu2_1, relu3_1]",
               "image.size": 96, "trainer.max_steps": 5}  # a 16 px halo: the 32 px tiles are real cuts
    fit_clip(clip_config(clip, tmp_path / "whole", **shallow), progress=False)
    tiles = _Tiles()
    fit_clip(clip_config(clip, tmp_path / "tiled", **shallow, **{"features.tile": 32}), progress=False, callbacks=[tiles])
    assert tiles.tiles == [32, 32, 32]
    for i in range(1, 4):
        a, b = (read_image(tmp_path / run / "frames" / f"{i:06d}.png") for run in ("tiled", "whole"))
        assert (a - b).abs().mean() < 2 / 255, i
    assert video_info(tmp_path / "tiled" / "stylised.mp4")[0] == 3


def _corrupt(tmp: Path) -> list[str]:
    bad = tmp / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    return [f"content={bad}"]


def _no_frames(tmp: Path) -> list[str]:
    path = tmp / "empty.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
        container.mux(stream.encode())
    return [f"content={path}"]


def _variable_rate(tmp: Path) -> list[str]:
    return [f"content={write_clip(tmp / 'vfr.mp4', pan(5), times_ms=[0, 40, 80, 240, 280])}"]


def _mixed_sizes(tmp: Path) -> list[str]:
    folder = tmp / "mixed"
    folder.mkdir()
    Image.fromarray(pan(1)[0]).save(folder / "a.png")
    Image.fromarray(pan(1, width=60)[0]).save(folder / "b.png")
    return [f"content={folder}", "video.enabled=true"]


def _gigantic(tmp: Path) -> list[str]:
    folder = tmp / "huge"
    folder.mkdir()
    Image.new("RGB", (8000, 4400), (90, 120, 150)).save(folder / "a.png", compress_level=1)
    return [f"content={folder}/*.png", "video.enabled=true"]


def _frames_and_a_video(tmp: Path) -> list[str]:
    a = write_clip(tmp / "a.mp4", pan(2))
    frame = tmp / "f.png"
    Image.fromarray(pan(1)[0]).save(frame)
    return [f"content=[{frame}, {a}]", "video.enabled=true"]


@pytest.mark.parametrize(
    "make_args, fragment",
    [
        (_corrupt, "corrupt or not a video"),
        (_no_frames, "no frames"),
        (_variable_rate, "variable frame rate"),
        (_mixed_sizes, "must have one size"),
        (_gigantic, "larger than 8K"),
        (_frames_and_a_video, "a clip is one video file or frames"),
        (lambda tmp: [f"content={write_clip(tmp / 'c.mp4', pan(2))}", "scales=[32,48]"], "scales"),
    ],
)
def test_a_bad_clip_is_one_line_exit_2_and_finished_frames_are_kept(tmp_path, make_args, fragment):
    out = tmp_path / "out"
    (out / "frames").mkdir(parents=True)
    finished = out / "frames" / "000001.png"
    Image.new("RGB", (8, 8)).save(finished)
    before = finished.read_bytes()
    args = ["fit", "-q", "--overwrite", "--set", f"output={out}"]
    for item in make_args(tmp_path):
        args += ["--set", item]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert finished.read_bytes() == before


@pytest.mark.parametrize("module", ["av", "cv2"])
def test_a_missing_video_extra_is_named_in_one_line(tmp_path, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # import of it now raises ImportError
    clip = write_clip(tmp_path / "c.mp4", pan(3)) if module == "cv2" else tmp_path / "c.mp4"
    r = CliRunner().invoke(app, ["fit", "-q", *[a for i in tiny_overrides(tmp_path / "o", 1, content=clip) for a in ("--set", i)]])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "nst-lightning[video]" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_estimate_reads_a_clips_frame_size_from_the_video_header_and_a_folder_of_clips_by_its_largest(tmp_path):
    from .test_cli import invoke, sets

    (tmp_path / "clips").mkdir()
    small, large = write_clip(tmp_path / "small.mp4", pan(2)), write_clip(tmp_path / "clips" / "large.mp4", pan(2, 96, 64))
    write_clip(tmp_path / "clips" / "other.mp4", pan(2))
    common = ["image.size=48", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    r = invoke("estimate", *sets([f"content={small}", *common]))
    assert r.exit_code == 0, r.output
    clip, shape, need, _ = r.stdout.strip().splitlines()
    assert clip == f"clip {small}: frames 64x48" and shape.startswith("image 48x36, styles ") and need.startswith("needs about")
    r = invoke("estimate", *sets([f"content={tmp_path / 'clips'}", *common]))
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == f"2 clips; the largest is {large} (96x64)"
    assert r.stdout.splitlines()[1].startswith("image 48x32, ")
