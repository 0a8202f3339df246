"""Judged quality of the bundled example (``configs/example.yaml``) for one or several copies of the package.

Each run is its own process with the given source tree first on ``PYTHONPATH``; the saved ``final.png`` is
scored by ``nst_lightning.judge`` (style and content distances, lower is better):

    python benchmarks/judge_example.py --tree after=. --tree before=/tmp/main-checkout --steps 100
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, steps: int, output: Path) -> None:
    """The example config for ``steps`` steps with the package at ``tree``, quietly, into ``output``."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [sys.executable, "-m", "nst_lightning", "fit", "-q", "--config", str(ROOT / "configs" / "example.yaml"),
         "--output", str(output), "--set", f"trainer.max_steps={steps}"],
        env=env, check=True, capture_output=True, text=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="default: the example's trainer.max_steps")
    args = parser.parse_args()

    from nst_lightning.config import load_config
    from nst_lightning.images import load_image, read_image
    from nst_lightning.judge import Judge

    config = load_config(ROOT / "configs" / "example.yaml")
    steps = args.steps or config.trainer.max_steps
    content, style = load_image(config.content, config.image.size), load_image(config.styles[0], config.image.size)
    judge = Judge()
    print(f"| tree ({config.image.size} px, {steps} steps) | style | style (sw) | content |")
    print("|---|---|---|---|")
    for item in args.tree:
        name, path = item.split("=", 1)
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(path), steps, Path(tmp) / "run")
            quality = judge(read_image(Path(tmp) / "run" / "final.png"), content, style)
        print(f"| {name} | {quality.style:.4f} | {quality.style_sw:.4f} | {quality.content:.4f} |", flush=True)


if __name__ == "__main__":
    main()
