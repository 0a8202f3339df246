"""Benchmark worker: one nst-lightning run through the public API, timed per step; prints JSON.

Run by benchmark.py in its own process so peak RSS and whole-process wall time are this run's alone.
Like the CLI, it asks for huge pages on large images before torch starts (nst_lightning.allocator).
"""

from __future__ import annotations

import json
import logging
import time
import warnings

T0 = time.perf_counter()

from worker_args import worker_parser  # noqa: E402

from nst_lightning.allocator import request_huge_pages  # noqa: E402


def main() -> None:
    p = worker_parser()
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    request_huge_pages(args.size)

    import torch
    from lightning.pytorch.callbacks import Callback

    from nst_lightning.api import fit
    from nst_lightning.config import load_config

    class StepClock(Callback):
        """Seconds since the first training step began, at the end of every step."""

        def __init__(self) -> None:
            self.start = 0.0
            self.times: list[float] = []

        def on_train_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.device.type == "cuda" and trainer.global_step == trainer.max_steps:
                torch.cuda.synchronize()  # steps are queued asynchronously: the last time is when all were computed
            self.times.append(time.perf_counter() - self.start)

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cfg = load_config(
        None,
        [
            f"content={args.content}",
            f"style={args.style}",
            f"output={args.output}",
            f"image.size={args.size}",
            f"trainer.max_steps={args.evals}",
            "optim.max_iter=1",
            f"snapshot.every_n_steps={args.snapshot_every}",
            f"checkpoint.every_n_steps={args.evals + 1}",
            *args.set,
        ],
    )
    clock = StepClock()
    fit(cfg, overwrite=True, progress=False, callbacks=[clock])
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else 0
    print(json.dumps({"step_times": clock.times, "setup_s": clock.start - T0, "precision": cfg.trainer.precision,
                      "gpu_peak_bytes": peak}))


if __name__ == "__main__":
    main()
