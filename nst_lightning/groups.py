"""Folder runs across processes: the strategy that keeps each rank on its own images, the stop that saves a
rank's running group, and the gather of every rank's results.

DistributedDataParallel would broadcast rank 0's parameters and average gradients, mixing different images;
``ShardedStrategy`` keeps DDP's launcher and process group and leaves the module unwrapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

from .config import RunConfig
from .data import PairResult
from .errors import ConfigError
from .faults import GracefulStop

FOLDER_STRATEGIES = ("auto", "ddp")


class ShardedStrategy(DDPStrategy):
    """DDP's launcher and process group without its model wrapper: each rank optimises its own images.

    DistributedDataParallel would broadcast rank 0's parameters and average gradients, mixing different
    images; here the module stays unwrapped, so nothing but the pair list and the results is exchanged.
    """

    def configure_ddp(self) -> None:
        """Keep the LightningModule as it is (no DistributedDataParallel, no gradient all-reduce)."""


def folder_strategy(config: RunConfig) -> str | ShardedStrategy:
    """``ShardedStrategy`` whenever the run may span several processes; plain ``auto`` on one device."""
    t = config.trainer
    one_device = str(t.devices) == "1" or (str(t.devices) == "auto" and t.accelerator == "cpu")
    if t.strategy == "auto" and one_device and t.num_nodes == 1:
        return "auto"
    return ShardedStrategy()


def check_folder_strategy(config: RunConfig, runs: str) -> str:
    """``trainer.strategy`` if a run of many images or clips (``runs`` says which) can honour it: each rank does
    its own items, so only ``auto`` and ``ddp`` launch it."""
    strategy = str(config.trainer.strategy)
    if strategy not in FOLDER_STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy} is not supported for {runs}; use auto or ddp")
    return strategy


class GroupStop(GracefulStop):
    """``GracefulStop`` for folder runs: on a stop signal each rank saves its running group's checkpoint."""

    def __init__(self) -> None:
        super().__init__(checkpoint_path="", image_path=None)

    def save_state(self, trainer: L.Trainer, pl_module: Any) -> Path | None:
        """Save the running group; a group stopped at its last step is finished (its images written) instead."""
        group = pl_module.group
        if group is not None and group.last and pl_module.batch_size:
            pl_module.finish_group(group)
            return None
        return pl_module.save_group()


def distributed_before() -> bool:
    """Whether a process group exists already (the caller's own, e.g. under torchrun with its own init)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def gather_results(results: list[PairResult], release: bool = False) -> list[PairResult]:
    """Every rank's results on every rank (one ``all_gather_object``); the local list when not distributed.

    ``release``: the run created the process group, so close it here, after a barrier, instead of leaving
    it to the interpreter's exit (where gloo's threads were torn down in no set order and a rank could
    abort with "terminate called without an active exception").
    """
    import torch.distributed as dist

    if not distributed_before():
        return list(results)
    everyone: list[list[PairResult] | None] = [None] * dist.get_world_size()
    if dist.get_world_size() == 1:
        everyone = [list(results)]
    else:
        dist.all_gather_object(everyone, results)
    if release:
        dist.barrier()
        dist.destroy_process_group()
    return [r for rank in everyone for r in (rank or [])]
