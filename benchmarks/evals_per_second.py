"""Loss evaluations per second of single runs, for one or several copies of the package (e.g. before/after).

Each measurement is its own process with the given source tree first on ``PYTHONPATH``, running
``nst_lightning.api.fit`` on the bundled pair (one L-BFGS evaluation per step) and timing the steps after
the first (so Trainer start-up, weights and targets are not counted). Trees alternate over ``--repeats``
rounds and each shows its best round, as other load on a shared machine only ever slows a round down:

    python benchmarks/evals_per_second.py --tree after=. --tree before=/tmp/main-checkout --sizes 256 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, logging, sys, time, warnings
from lightning.pytorch.callbacks import Callback
from nst_lightning.api import fit
from nst_lightning.config import load_config

size, steps, output = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
times = []

class Clock(Callback):
    def on_train_batch_end(self, trainer, pl_module, *args):
        times.append(time.perf_counter())

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")
cfg = load_config(None, [f"output={output}", f"image.size={size}", f"trainer.max_steps={steps}", "optim.max_iter=1",
                         "snapshot.every_n_steps=0", f"checkpoint.every_n_steps={steps + 1}"])
fit(cfg, progress=False, callbacks=[Clock()])
print(json.dumps({"evals_per_s": (len(times) - 1) / (times[-1] - times[0])}))
"""


def measure(tree: Path, size: int, steps: int) -> float:
    """Evaluations per second of one run of the package at ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as out:
        run = subprocess.run(
            [sys.executable, "-c", WORKER, str(size), str(steps), str(Path(out) / "run")],
            capture_output=True, text=True, env=env, check=True,
        )
    return json.loads(run.stdout.strip().splitlines()[-1])["evals_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (repeatable)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=12, help="steps per run; the first is not timed")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.tree)
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.repeats):
        for size in args.sizes:
            for name, path in trees.items():
                rate = measure(Path(path), size, args.steps)
                best[name, size] = max(best.get((name, size), 0.0), rate)
                print(f"  {name} {size} px: {rate:.3f} evaluations/s", file=sys.stderr, flush=True)
    print("| size | " + " | ".join(trees) + " |")
    print("|---|" + "---|" * len(trees))
    for size in args.sizes:
        print(f"| {size} px | " + " | ".join(f"{best[name, size]:.3f}/s" for name in trees) + " |")


if __name__ == "__main__":
    main()
