"""Run every shipped config at its own size under 32-true and bf16-mixed for a few steps; print the losses.

A NaN, an infinity or a loss that rises from its first value marks a config as unstable. Figures depend on
the machine; the unit test (tests/test_stability.py) covers 64 px.

    python benchmarks/stability.py --steps 2 --evals 5
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
from pathlib import Path

from nst_lightning import fit, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="Trainer steps per run (per stage when staged)")
    parser.add_argument("--evals", type=int, default=5, help="cap on L-BFGS evaluations per step")
    args = parser.parse_args()
    print("| config | size | precision | first loss | last loss | finite |")
    print("|---|---|---|---|---|---|")
    for config in CONFIGS:
        base = load_config(config)
        for precision in ("32-true", "bf16-mixed"):
            with tempfile.TemporaryDirectory() as tmp:
                overrides = [
                    f"output={tmp}/run",
                    f"trainer.precision={precision}",
                    f"trainer.max_steps={args.steps}",
                    f"optim.max_iter={min(args.evals, base.optim.max_iter)}",
                    "snapshot.every_n_steps=0",
                ]
                if base.scales:
                    overrides.append(f"scale_steps={[args.steps] * len(base.scales)}")
                cfg = load_config(config, overrides)
                fit(cfg, progress=False)
                with open(Path(cfg.output) / "losses.csv", newline="") as f:
                    losses = [float(r["loss"]) for r in csv.DictReader(f)]
            finite = all(math.isfinite(v) for v in losses)
            print(f"| {config.stem} | {cfg.image.size} | {precision} | {losses[0]:.4g} | {losses[-1]:.4g} | {finite} |", flush=True)


if __name__ == "__main__":
    main()
