"""Judged quality of the bundled example (``configs/example.yaml``) for one or several copies of the package.

Each run is its own process with the given source tree first on ``PYTHONPATH`` and that tree's own example
config (a tree without one runs this one's), so an older tree is not handed keys it cannot parse; ``--steps``
sets every run's steps. The saved ``final.png`` is scored by ``nst_lightning.judge`` (style and content
distances, lower is better):

    python benchmarks/judge_example.py --tree after=. --tree before=/tmp/main-checkout --steps 100
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def example_config(tree: Path) -> Path:
    """``tree``'s own example config, or this tree's where it has none."""
    own = tree / "configs" / "example.yaml"
    return own if own.is_file() else ROOT / "configs" / "example.yaml"


def run(tree: Path, steps: int | None, output: Path) -> None:
    """``tree``'s example config (for ``steps`` steps if given) with the package at ``tree``, quietly, into ``output``."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [sys.executable, "-m", "nst_lightning", "fit", "-q", "--config", str(example_config(tree)),
         "--output", str(output), *(["--set", f"trainer.max_steps={steps}"] if steps else [])],
        env=env, cwd=tree, check=True, capture_output=True, text=True,  # cwd: `-m` puts it before PYTHONPATH
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="default: each tree's example's own trainer.max_steps")
    args = parser.parse_args()

    from nst_lightning.config import load_config
    from nst_lightning.images import load_image, read_image
    from nst_lightning.judge import Judge

    config = load_config(ROOT / "configs" / "example.yaml")
    content, style = load_image(config.content, config.image.size), load_image(config.styles[0], config.image.size)
    judge = Judge()
    print(f"| tree ({config.image.size} px) | steps | style | style (sw) | content |")
    print("|---|---|---|---|---|")
    for item in args.tree:
        name, path = item.split("=", 1)
        tree = Path(path)
        steps = args.steps or yaml.safe_load(example_config(tree).read_text()).get("trainer", {}).get("max_steps", "default")
        with tempfile.TemporaryDirectory() as tmp:
            run(tree, args.steps, Path(tmp) / "run")
            quality = judge(read_image(Path(tmp) / "run" / "final.png"), content, style)
        print(f"| {name} | {steps} | {quality.style:.4f} | {quality.style_sw:.4f} | {quality.content:.4f} |", flush=True)


if __name__ == "__main__":
    main()
