"""Folder runs: the groups' lifecycle on the module (a callback), their checkpoints, the strategy that keeps each
rank on its own images, the stop that saves a rank's running group, and the gather of every rank's results.

DistributedDataParallel would broadcast rank 0's parameters and average gradients, mixing different images;
``ShardedStrategy`` keeps DDP's launcher and process group and leaves the module unwrapped. Nothing here knows
the module's class: the callback works through its public methods, so the module can bring it itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from .atomic import atomic_write
from .config import RunConfig
from .data import GroupStep, PairResult
from .errors import CheckpointError, ConfigError, NSTError
from .faults import GracefulStop
from .images import save_image
from .pairs import Pair
from .resources import is_out_of_memory

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "nst_lightning"
"""Where a checkpoint (a run's or a group's) keeps the fingerprint of the images and settings it was written by."""
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


class FolderGroups(Callback):
    """The lifecycle of a folder run's groups on one module, step by step as ``StylePairsDataModule`` serves them.

    At a group's first step its loadable pairs become the module's problem with a fresh optimiser (an interrupted
    group continues from its checkpoint); at steps the data marks, and on a stop, the group is saved; at its last
    step its images are written. A group that runs out of memory fails its pairs in one line and the rank goes on,
    so no rank dies alone and leaves the others waiting in the final gather. ``results`` says what became of
    each pair this rank handled.
    """

    def __init__(self) -> None:
        self.results: list[PairResult] = []
        self.group: GroupStep | None = None
        self.pairs: list[Pair] = []
        self.started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.results = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, GroupStep):
            if batch.first:
                self.start(trainer, pl_module, batch)
            self.group = batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not isinstance(batch, GroupStep):
            return
        if pl_module.ran_out_of_memory:
            self.fail_out_of_memory(trainer, pl_module)
        elif not pl_module.batch_size:
            return
        elif batch.last:
            self.finish(pl_module, batch)
        elif batch.save:
            self.save(pl_module)

    def start(self, trainer: L.Trainer, module: Any, batch: GroupStep) -> None:
        """Make the group's loadable pairs the problem; an interrupted group continues from its saved state."""
        good = []
        for item in batch.items or []:
            error = item.error
            if error is None:
                try:
                    module.check_sizes(item.content, item.styles)
                except NSTError as err:
                    error = str(err)
            if error is None:
                good.append(item)
            else:
                self.results.append(self._result(module, item.pair, "failed", error=error))
        self.group = batch
        self.pairs = [item.pair for item in good]
        self.started = time.perf_counter()
        if not good:
            module.clear_images()
            return
        try:
            module.set_images(torch.cat([item.content for item in good]), [item.styles for item in good])
            module.prepare_targets()
        except BaseException as err:
            if not is_out_of_memory(err):
                raise
            self.fail_out_of_memory(trainer, module)
            return
        trainer.strategy.setup_optimizers(trainer)  # a fresh optimiser over the new images (the module's own)
        if batch.resume is not None:
            self._restore(module, batch.resume)

    def fail_out_of_memory(self, trainer: L.Trainer, module: Any) -> None:
        """The running group did not fit: its pairs fail with one line (said on this rank at once, and in the
        summary every rank gathers), its memory is freed and its optimiser history dropped."""
        h, w = module.image.shape[-2:] if module.image.dim() == 4 else (0, 0)
        message = (
            f"out of memory on {module.image.device.type} optimising {len(self.pairs)} image(s) of {w}x{h} "
            "together; lower batch.images_per_device or image.size"
        )
        self.results.extend(self._result(module, pair, "failed", error=message) for pair in self.pairs)
        log.warning("rank %d: %s (%s)", module.global_rank, message, ", ".join(p.name for p in self.pairs))
        self.pairs = []
        module.ran_out_of_memory = False
        module.clear_images()
        trainer.strategy.setup_optimizers(trainer)

    def state(self, module: Any) -> dict[str, Any]:
        """What a group checkpoint holds: members, fingerprint, step, images (and average) and optimiser state."""
        return {
            "members": [p.name for p in self.pairs],
            FINGERPRINT_KEY: module.fingerprint,
            "step": self.group.step,
            "state_dict": module.checkpoint_state(),
            "optimizer": module.optimizers().optimizer.state_dict(),
        }

    def save(self, module: Any) -> Path | None:
        """Write the running group's checkpoint (atomically, by this rank alone); its path, or None if none runs."""
        if not module.batch_size or self.group is None:
            return None
        path = Path(self.group.checkpoint)
        state = self.state(module)
        atomic_write(path, lambda fh: torch.save(state, fh), fsync=True)
        return path

    def _restore(self, module: Any, saved: Mapping[str, Any]) -> None:
        if saved.get("members") != [p.name for p in self.pairs] or saved.get(FINGERPRINT_KEY) != module.fingerprint:
            raise CheckpointError(
                f"{self.group.checkpoint} was written by a run with other images or settings; rerun with "
                "overwrite=True to start the folder again, or restore the settings it was written with"
            )
        module.restore_state(saved["state_dict"])
        state = saved["optimizer"]
        for group in state.get("param_groups", []):
            group["lr"] = module.optim_config.learning_rate
        module.optimizers().optimizer.load_state_dict(state)

    @torch.no_grad()
    def finish(self, module: Any, batch: GroupStep) -> None:
        """Write each image of the group to its pair's file and record its loss at the result (unscaled)."""
        module.check_finite()
        losses = module.loss_terms()["loss"].tolist()
        seconds = (time.perf_counter() - self.started) / module.batch_size
        for pair, image, loss in zip(self.pairs, module.result(), losses):
            save_image(image.unsqueeze(0), pair.output)
            self.results.append(self._result(module, pair, "done", loss=loss, seconds=seconds))
        Path(batch.checkpoint).unlink(missing_ok=True)
        module.clear_images()

    @staticmethod
    def _result(module: Any, pair: Pair, status: str, **details: Any) -> PairResult:
        return PairResult(pair.name, pair.content, list(pair.styles), pair.output, module.global_rank, status, **details)


class GroupStop(GracefulStop):
    """``GracefulStop`` for folder runs: on a stop signal each rank saves its running group's checkpoint."""

    def __init__(self, groups: FolderGroups) -> None:
        super().__init__(checkpoint_path="", image_path=None)
        self.groups = groups

    def save_state(self, trainer: L.Trainer, pl_module: Any) -> Path | None:
        """Save the running group; a group stopped at its last step is finished (its images written) instead."""
        group = self.groups.group
        if group is not None and group.last and pl_module.batch_size:
            self.groups.finish(pl_module, group)
            return None
        return self.groups.save(pl_module)


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
