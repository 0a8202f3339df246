r"""Quality per second on the bundled pairs: the default config, ``gatys2015`` and ``crowsonkb``, judged two ways.

Each method runs in this process at ``--size``, on its own schedule (``crowsonkb`` climbs by sqrt 2 from 128 px to
the size, 1000 steps at the first scale and 500 at each later one), or with ``--budget N`` on N evaluations at
the full size (``default`` N steps, ``gatys2015`` N/20 steps of 20). ``crowsonkb-short`` runs crowsonkb's scales
with its steps cut to the default's evaluations weighted by pixels (a 128 px step costs a quarter of a 256 px
one), about its wall time; the table shows the times measured. Every saved result is scored by
``nst_lightning.judge.Judge``: style as the relative Gram distance and as the relative sliced Wasserstein
distance (``sw``, which no loss here optimises), content as the relu4_2 distance; lower is better, and a result
better on both style statistics is better. Prints a Markdown table and writes one contact sheet per pair
(content | style | each result) to ``--sheets``.

    python benchmarks/quality.py --size 256 --sheets docs/quality
    python benchmarks/quality.py --size 256 --budget 100 --methods default crowsonkb-short gatys2015 --sheets docs/quality
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from nst_lightning import fit, load_config
from nst_lightning.config import EXAMPLE_CONTENT, EXAMPLE_STYLE, EXAMPLE_STYLE_2
from nst_lightning.images import load_image, read_image
from nst_lightning.judge import Judge, Quality

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAIRS = [(EXAMPLE_CONTENT, EXAMPLE_STYLE), (EXAMPLE_CONTENT, EXAMPLE_STYLE_2)]
METHODS = ("default", "gatys2015", "crowsonkb", "crowsonkb-short")


@dataclass
class Result:
    """One method's run on one pair: what it cost and how it was judged."""

    method: str
    evaluations: int
    seconds: float
    quality: Quality
    image: Image.Image


def peer_scales(size: int, start: int = 128) -> list[int]:
    """crowsonkb's ``gen_scales``: sizes ``size / sqrt(2)^i`` down to ``start``, rounded, ascending."""
    scales, i = set(), 0
    while (scale := round(size / math.sqrt(2) ** i)) >= min(start, size):
        scales.add(scale)
        i += 1
    return sorted(scales)


def overrides(method: str, size: int, budget: int | None) -> tuple[Path, list[str]]:
    """The config file and ``--set`` items of ``method`` at ``size``, cut to ``budget`` full-size evaluations if given."""
    if method == "default":
        return CONFIGS / "example.yaml", [f"image.size={size}", *([f"trainer.max_steps={budget}"] if budget else [])]
    if method == "gatys2015":
        return CONFIGS / "gatys2015.yaml", [f"image.size={size}", *([f"trainer.max_steps={math.ceil(budget / 20)}"] if budget else [])]
    scales = peer_scales(size)
    steps = [1000] + [500] * (len(scales) - 1)
    if method == "crowsonkb-short":
        evaluations = budget or load_config(CONFIGS / "example.yaml").trainer.max_steps
        factor = evaluations * size**2 / sum(n * s**2 for n, s in zip(steps, scales))
        steps = [max(1, round(n * factor)) for n in steps]
    return CONFIGS / "crowsonkb.yaml", [f"scales={scales}", f"scale_steps={steps}"]


def run(method: str, content: Path, style: Path, size: int, work: Path, judge: Judge, budget: int | None) -> Result:
    """Fit ``method`` on the pair and judge the saved ``final.png``."""
    path, items = overrides(method, size, budget)
    cfg = load_config(path, [f"content={content}", f"style={style}", f"output={work / method}", "snapshot.every_n_steps=0",
                             *items])
    evaluations = sum(steps for _, steps in cfg.stages()) * cfg.optim.max_iter
    start = time.perf_counter()
    outputs = fit(cfg, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    result = read_image(outputs.final)
    quality = judge(result, load_image(content), load_image(style, max(result.shape[-2:])))
    return Result(method, evaluations, seconds, quality, Image.open(outputs.final).convert("RGB"))


def sheet(content: Path, style: Path, results: list[Result], path: Path) -> None:
    """One JPEG: content | style | each result, labelled with its method, time and both style statistics."""
    w, h = results[0].image.size
    label = 28
    panels = [("content", None, Image.open(content).convert("RGB")), ("style", None, Image.open(style).convert("RGB"))]
    panels += [(r.method, r, r.image) for r in results]
    out = Image.new("RGB", (w * len(panels), h + label), "white")
    draw = ImageDraw.Draw(out)
    for i, (name, r, img) in enumerate(panels):
        img = img.copy()
        img.thumbnail((w, h))
        out.paste(img, (i * w, label))
        draw.text((i * w + 3, 1), name if r is None else f"{name}, {r.seconds:.0f} s", fill="black")
        if r is not None:
            q = r.quality
            draw.text((i * w + 3, 14), f"gram {q.style:.3f} sw {q.style_sw:.3f} content {q.content:.3f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, quality=88)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budget", type=int, default=None,
                        help="full-size evaluations for default and gatys2015 (and crowsonkb-short's pixel budget)")
    parser.add_argument("--style", action="append", default=None, help="only the pairs with this style (file stem)")
    parser.add_argument("--sheets", type=Path, default=None, help="write SHEETS/<style>_<size>.jpg")
    parser.add_argument("--keep", type=Path, default=None, help="keep each run in KEEP/<style>/<method> (default: a temporary folder)")
    args = parser.parse_args()
    judge = Judge()
    budget = f"{args.budget} full-size evaluations each (shortened)" if args.budget else "own schedules"
    print(f"{args.size} px, {budget}; wall time of fit() in this process; judged on the saved 8-bit images")
    print("| pair | method | evaluations | wall s | style (Gram) | style (sw) | content |")
    print("|---|---|---|---|---|---|---|")
    for content, style in [p for p in PAIRS if args.style is None or p[1].stem in args.style]:
        results: dict[str, Result] = {}
        with tempfile.TemporaryDirectory() as tmp:
            work = args.keep / style.stem if args.keep else Path(tmp)
            for method in args.methods:
                r = results[method] = run(method, content, style, args.size, work, judge, args.budget)
                q = r.quality
                print(f"| {content.stem} x {style.stem} | {method} | {r.evaluations} | {r.seconds:.0f} | {q.style:.4f} | "
                      f"{q.style_sw:.4f} | {q.content:.4f} |", flush=True)
                if args.sheets:  # after each method, so a stopped benchmark leaves what it measured
                    sheet(content, style, list(results.values()), args.sheets / f"{style.stem}_{args.size}.jpg")


if __name__ == "__main__":
    main()
