"""Benchmark worker: one nst-lightning run through the public API, timed per step; prints JSON.

Run by benchmark.py and gpu_check.py in its own process so peak RSS, GPU memory and whole-process wall time
are this run's alone. Like the CLI, it asks for huge pages on large images before torch starts
(nst_lightning.allocator). Reports the precision the run used (``auto`` resolved), and on CUDA the peak
allocated and reserved memory, the CUDA graph's private pool, the graph's warm-up/capture/replay counts and
the one-time costs (first step, capture) apart from the steady seconds per evaluation.
"""

from __future__ import annotations

import json
import logging
import time
import warnings

T0 = time.perf_counter()

from worker_args import worker_parser  # noqa: E402

from nst_lightning.allocator import request_huge_pages  # noqa: E402

GiB = 1024**3


def main() -> None:
    p = worker_parser()
    p.add_argument("--set", action="append", default=[])
    p.add_argument(
        "--memory-budget-gib", type=float, default=None,
        help="plan checkpointed VGG blocks for this many GiB instead of the free memory (features.checkpoint_blocks "
        "set from the plan); on CUDA the allocator is also capped there, so the run fits the budget or fails",
    )
    args = p.parse_args()
    request_huge_pages(args.size)

    import torch
    from lightning.pytorch.callbacks import Callback

    from nst_lightning.api import fit
    from nst_lightning.config import load_config
    from nst_lightning.cudagraph import WARMUP_STEPS
    from nst_lightning.images import read_size
    from nst_lightning.resources import plan_memory, run_precision

    class StepClock(Callback):
        """Seconds since the first training step began, at the end of every step; on CUDA the steps up to the
        split step and the last are synchronised, so one-time costs separate from the steady ones."""

        def __init__(self) -> None:
            self.start = 0.0
            self.times: list[float] = []
            self.graph = None
            self.capture_step = 0
            self.blocks = 0
            self.pool_bytes = 0

        @property
        def split(self) -> int:
            """The step ending the one-time costs: the capture step, or the first after the warm-up where none was."""
            return self.capture_step or WARMUP_STEPS + 1

        def on_train_start(self, trainer, pl_module) -> None:
            graph = getattr(trainer.optimizers[0], "graph", None)
            self.graph = graph
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            cuda = pl_module.device.type == "cuda"
            if self.graph is not None and not self.capture_step and self.graph.captures:
                self.capture_step = step
            if cuda and (step == trainer.max_steps or step <= self.split):
                torch.cuda.synchronize()  # steps are queued asynchronously: times are when the step was computed
            self.times.append(time.perf_counter() - self.start)
            self.blocks = pl_module.checkpoint_blocks

        def on_train_end(self, trainer, pl_module) -> None:
            if pl_module.device.type == "cuda":
                self.pool_bytes = graph_pool_bytes()

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    overrides = [
        f"content={args.content}",
        f"style={args.style}",
        f"output={args.output}",
        f"image.size={args.size}",
        f"trainer.max_steps={args.evals}",
        "optim.max_iter=1",
        f"snapshot.every_n_steps={args.snapshot_every}",
        f"checkpoint.every_n_steps={args.evals + 1}",
        *args.set,
    ]
    cfg = load_config(None, overrides)
    planned = None
    if args.memory_budget_gib is not None:
        shapes = (read_size(cfg.content), [read_size(s) for s in cfg.styles])
        blocks, estimate = plan_memory(cfg, *shapes, round(args.memory_budget_gib * GiB))
        planned = {"budget_gib": args.memory_budget_gib, "blocks": blocks, "estimate_gib": estimate.total / GiB}
        cfg = load_config(None, [*overrides, f"features.checkpoint_blocks={blocks}"])
        if cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_budget_gib * GiB / total))
    clock = StepClock()
    fit(cfg, overwrite=True, progress=False, callbacks=[clock])
    cuda = torch.cuda.is_initialized()
    graph = clock.graph
    print(json.dumps({
        "step_times": clock.times,
        "setup_s": clock.start - T0,
        "precision": run_precision(cfg),
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
        "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
        "graph_pool_bytes": clock.pool_bytes,
        "captures": graph.captures if graph is not None else 0,
        "replays": graph.replays if graph is not None else 0,
        "capture_step": clock.capture_step,
        "split_step": clock.split,
        "checkpoint_blocks": clock.blocks,
        "memory_plan": planned,
    }))


def graph_pool_bytes() -> int:
    """Bytes the caching allocator holds in private pools (CUDA graphs'), from its segment snapshot."""
    import torch

    return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))


if __name__ == "__main__":
    main()
