r"""Time to quality: named recipes (``--set`` overrides of ``configs/example.yaml``) against its plain 300-step form.

Each recipe runs as its own ``nst-lightning fit`` process on the example's pair (or ``--style``), under an ISA
imitation (``--isa avx2``: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, the code paths of an AVX2-only
CPU, where precision ``auto`` is fp32) and ``--threads`` OpenMP threads, all under the same conditions. Measured:
the whole process's wall time and the optimisation's (the progress lines' seconds per step times the steps, summed
over the stages); the saved ``final.png`` judged by ``nst_lightning.judge`` (style as Gram and sliced Wasserstein
distances, content; lower is better). A recipe qualifies when both style statistics are within ``--tolerance`` of
the baseline's or better, content is not worse by more than it, and its wall time is at most ``--time-budget`` of
the baseline's. Prints a Markdown table with the ratios and writes a contact sheet (content | style | baseline |
each recipe) to ``--sheet``. ``--keep DIR`` keeps every run with a ``record.json``; ``--reuse`` then takes a
recorded run instead of running it again (to add recipes to a table), and ``baseline-rerun`` at the end shows the
machine's drift.

    python benchmarks/time_to_quality.py --keep /tmp/ttq --sheet docs/quality/time_to_quality_starry_night.jpg
    python benchmarks/time_to_quality.py --recipes baseline c2f-160 --keep /tmp/ttq --reuse
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLE = ROOT / "configs" / "example.yaml"

PLAIN = ["optim.precondition_levels=0", "trainer.max_steps=300"]
"""The example before issue 26 (plain L-BFGS, 300 steps): the baseline, and the start of every plain recipe."""

C2F_128_224_DETAIL = ["scales=[128, 224, 320]", "scale_steps=[200, 60, 50]", "scale_init=detail"]
"""The three-scale ``scale_init=detail`` recipe; the content-weight variants are it plus one item."""

PLAIN_RECIPES: dict[str, list[str]] = {
    "short-110": ["trainer.max_steps=110"],
    "c2f-160": ["scales=[160, 320]", "scale_steps=[200, 70]"],
    "c2f-128-224": ["scales=[128, 224, 320]", "scale_steps=[200, 60, 50]"],
    "h100-110": ["optim.history_size=100", "trainer.max_steps=110"],
    "c2f-160-90": ["scales=[160, 320]", "scale_steps=[90, 80]"],
    "c2f-160-90-h100": ["scales=[160, 320]", "scale_steps=[90, 80]", "optim.history_size=100"],
    "c2f-160-detail": ["scales=[160, 320]", "scale_steps=[200, 70]", "scale_init=detail"],
    "c2f-128-224-detail": C2F_128_224_DETAIL,
    "c2f-128-224-detail-cw12": [*C2F_128_224_DETAIL, "loss.content_weight=1.2"],
    "c2f-128-224-detail-cw14": [*C2F_128_224_DETAIL, "loss.content_weight=1.4"],
    "c2f-128-224-detail-s100-60-70": ["scales=[128, 224, 320]", "scale_steps=[100, 60, 70]", "scale_init=detail"],
    "c2f-224-detail-s80-70": ["scales=[224, 320]", "scale_steps=[80, 70]", "scale_init=detail"],
    "c2f-224-detail-s60-80": ["scales=[224, 320]", "scale_steps=[60, 80]", "scale_init=detail"],
    "wolfe-90": ["optim.line_search=strong_wolfe", "trainer.max_steps=90"],
}
"""The recipes tried on plain L-BFGS: each is ``PLAIN`` and then these items."""

RECIPES: dict[str, list[str]] = {
    "baseline": PLAIN,
    **{name: [*PLAIN, *items] for name, items in PLAIN_RECIPES.items()},
    "precondition-5-100": ["optim.precondition_levels=5", "trainer.max_steps=100"],
    "baseline-rerun": PLAIN,
}
"""Recipe name -> ``--set`` items over configs/example.yaml (320 px, history 20; since issue 26 it is
``precondition-5-100``)."""

ISA = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "native": {}}
PROGRESS = re.compile(r"step (\d+)/(\d+) \(\d+%\), ([\d.]+) s/step")


def optimisation_seconds(stderr: str) -> float:
    """The optimisation's seconds from the CLI's progress lines: per stage, the last line's s/step times its step.

    Each stage's progress restarts at step 1 and prints its running mean since its first step; a line whose step
    is not above the previous one's starts a new stage.
    """
    total, last, previous = 0.0, 0.0, 0
    for step, _, rate in PROGRESS.findall(stderr):
        if int(step) <= previous:
            total += last
        previous, last = int(step), int(step) * float(rate)
    return total + last


def steps_per_scale(items: list[str]) -> str:
    """``"160x200 + 320x70"``: each stage's size and steps, from the recipe's config."""
    from nst_lightning.config import load_config

    return " + ".join(f"{size}x{steps}" for size, steps in load_config(EXAMPLE, items).stages())


def run(name: str, items: list[str], work: Path, reuse: bool) -> dict:
    """Fit recipe ``name`` in a fresh ``nst-lightning fit`` process into ``work/name``; its figures as a dict."""
    out = work / name
    record = out / "record.json"
    if reuse and record.is_file():
        return json.loads(record.read_text())
    sets = [arg for item in items for arg in ("--set", item)]
    cmd = [sys.executable, "-m", "nst_lightning", "fit", "--config", str(EXAMPLE), "--output", str(out), "--overwrite", *sets]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"recipe {name} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    figures = {"name": name, "items": items, "wall_s": wall, "optimisation_s": optimisation_seconds(proc.stderr),
               "load": os.getloadavg()[0]}
    record.write_text(json.dumps(figures))
    return figures


def judge_run(figures: dict, work: Path, judge, content, style) -> dict:
    """``figures`` with the judged quality of the run's ``final.png``."""
    from nst_lightning.images import read_image

    q = judge(read_image(work / figures["name"] / "final.png"), content, style)
    return {**figures, "style": q.style, "style_sw": q.style_sw, "content": q.content}


def qualifies(r: dict, base: dict, tolerance: float, budget: float) -> bool:
    """Both style statistics and content within ``tolerance`` of the baseline or better, in ``budget`` of its time."""
    return (all(r[k] <= base[k] * (1 + tolerance) for k in ("style", "style_sw", "content"))
            and r["wall_s"] <= budget * base["wall_s"])


def sheet(content: Path, style: Path, results: list[dict], work: Path, path: Path) -> None:
    """One JPEG: content | style | each result, labelled with its recipe, wall time and judged figures."""
    from PIL import Image, ImageDraw

    images = [Image.open(work / r["name"] / "final.png").convert("RGB") for r in results]
    w, h = images[0].size
    label = 28
    panels = [("content", None, Image.open(content).convert("RGB")), ("style", None, Image.open(style).convert("RGB"))]
    panels += [(r["name"], r, img) for r, img in zip(results, images)]
    out = Image.new("RGB", (w * len(panels), h + label), "white")
    draw = ImageDraw.Draw(out)
    for i, (name, r, img) in enumerate(panels):
        img = img.copy()
        img.thumbnail((w, h))
        out.paste(img, (i * w, label))
        draw.text((i * w + 3, 1), name if r is None else f"{name}, {r['wall_s']:.0f} s", fill="black")
        if r is not None:
            draw.text((i * w + 3, 14), f"gram {r['style']:.3f} sw {r['style_sw']:.3f} content {r['content']:.3f}",
                      fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, quality=88)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES,
                        help="recipes to run, in order; the first is the baseline the ratios refer to")
    parser.add_argument("--style", type=Path, default=None, help="another style image (default: the example's)")
    parser.add_argument("--isa", choices=ISA, default="avx2", help="CPU code paths to imitate (native: this CPU's own)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run and of the judge")
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--time-budget", type=float, default=0.40, help="wall time allowed, as a fraction of the baseline's")
    parser.add_argument("--keep", type=Path, default=Path("runs/time_to_quality"), help="folder of the runs")
    parser.add_argument("--reuse", action="store_true", help="take recorded runs in --keep instead of running them again")
    parser.add_argument("--sheet", type=Path, default=None, help="write the contact sheet here (JPEG)")
    args = parser.parse_args()
    os.environ.update({**ISA[args.isa], "OMP_NUM_THREADS": str(args.threads)})  # before torch loads, for every child

    import torch
    from benchmark import machine

    from nst_lightning.config import load_config
    from nst_lightning.hardware import resolve_precision
    from nst_lightning.images import load_image
    from nst_lightning.judge import Judge

    config = load_config(EXAMPLE)
    style_path = args.style or Path(config.styles[0])
    if args.style:
        RECIPES.update({name: [f"style={args.style.resolve()}", *items] for name, items in RECIPES.items()})
    work = args.keep / style_path.stem
    work.mkdir(parents=True, exist_ok=True)
    isa = " ".join(f"{k}={v}" for k, v in ISA[args.isa].items()) or "none"
    print(f"{machine()}; ISA imitation: {isa} (torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"precision auto = {resolve_precision('auto', 'cpu')}); OMP_NUM_THREADS={args.threads}")
    print(f"{Path(config.content).stem} x {style_path.stem}, configs/example.yaml with each recipe's --set items; "
          f"wall = the whole `nst-lightning fit` process; judged on the saved final.png; ratios to {args.recipes[0]}")
    print("| recipe | steps per scale | wall s | optimisation s | style (Gram) | style (sw) | content | wall | Gram | sw | content | qualifies |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    judge = Judge()
    content = load_image(config.content, config.image.size)
    style = load_image(style_path, config.image.size)
    results: list[dict] = []
    for name in args.recipes:
        r = judge_run(run(name, RECIPES[name], work, args.reuse), work, judge, content, style)
        results.append(r)
        base = results[0]
        ratio = {k: r[k] / base[k] for k in ("wall_s", "style", "style_sw", "content")}
        verdict = "-" if r is base else ("yes" if qualifies(r, base, args.tolerance, args.time_budget) else "no")
        print(f"| {name} | {steps_per_scale(RECIPES[name])} | {r['wall_s']:.0f} | {r['optimisation_s']:.0f} | "
              f"{r['style']:.4f} | {r['style_sw']:.4f} | {r['content']:.4f} | {ratio['wall_s']:.2f} | "
              f"{ratio['style']:.3f} | {ratio['style_sw']:.3f} | {ratio['content']:.3f} | {verdict} |", flush=True)
        if args.sheet:  # after each recipe, so a stopped benchmark leaves what it measured
            sheet(Path(config.content), style_path, results, work, args.sheet)


if __name__ == "__main__":
    main()
