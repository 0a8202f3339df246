"""Folder runs: many content x style pairs, several images per device, sharded over devices and nodes.

The engine is the single run's ``StyleTransferModule`` trained by ``Trainer.fit``: ``StylePairsDataModule``
feeds it groups of same-size pairs step by step, and it writes each image to its pair's file when its group
ends. Lightning's launcher (``devices``, ``num_nodes``, ``strategy``; SLURM and torchrun detected) runs it
on every rank; each rank takes its own groups and ``ShardedStrategy`` keeps DDP from averaging gradients or
broadcasting images between ranks. ``fit_batch`` assembles it from a config and ends with a summary of what
every rank produced.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm

from .api import build_module, build_trainer, init_input, load_masks
from .atomic import check_writable, is_write_failure, remove_stale_temps, write_failure, write_text_atomic
from .config import RunConfig, dump_config
from .data import GroupStep, PairResult, StylePairsDataModule
from .errors import ConfigError, NSTError, NumericalError, ResourceError, RunInterrupted
from .faults import GracefulStop
from .images import read_size
from .pairs import expand_pairs, pending
from .quiet import lightning_quiet
from .resources import check_fits, is_out_of_memory, refuse_tiling

SUMMARY_FILE = "batch-summary.json"
FOLDER_STRATEGIES = ("auto", "ddp")
UNSUPPORTED_KEYS = {
    "scales": lambda c: c.scales is not None,
    "features.onnx": lambda c: c.features.onnx is not None,
}
"""Single-run keys a folder run does not honour: it is refused naming them instead of silently ignoring them."""

__all__ = ["BatchReport", "PairResult", "ShardedStrategy", "fit_batch", "gather_results"]


class ShardedStrategy(DDPStrategy):
    """DDP's launcher and process group without its model wrapper: each rank optimises its own images.

    DistributedDataParallel would broadcast rank 0's parameters and average gradients, mixing different
    images; here the module stays unwrapped, so nothing but the pair list and the results is exchanged.
    """

    def configure_ddp(self) -> None:
        """Keep the LightningModule as it is (no DistributedDataParallel, no gradient all-reduce)."""


class ImagesProgressBar(Callback):
    """Two bars on rank zero: images done (of this rank's share) and the current group's steps."""

    def __init__(self) -> None:
        self.images: tqdm | None = None
        self.steps: tqdm | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        total = dataset.images() if hasattr(dataset, "images") else None
        label = "images" if trainer.world_size == 1 else f"images (rank 0 of {trainer.world_size})"
        self.images = tqdm(total=total, desc=label, unit="img", position=0, dynamic_ncols=True)
        self.steps = tqdm(desc="steps", position=1, leave=False, dynamic_ncols=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.steps is None or not isinstance(batch, GroupStep) or batch.idle:
            return
        if batch.first:
            self.steps.reset(total=batch.steps)
            self.steps.update(batch.step - 1)
        self.steps.update(1)
        if batch.last and self.images is not None:
            self.images.update(len(batch.pairs))

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        for bar in (self.steps, self.images):
            if bar is not None:
                bar.close()
        self.images = self.steps = None


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


@dataclass
class BatchReport:
    """What a batch run did, across all ranks; the same on every rank."""

    output: Path
    total: int
    skipped: list[str]
    results: list[PairResult]
    world_size: int = 1
    is_global_zero: bool = True
    unit: str = "images"
    done: list[PairResult] = field(init=False)
    failed: list[PairResult] = field(init=False)

    def __post_init__(self) -> None:
        self.done = [r for r in self.results if r.status == "done"]
        self.failed = [r for r in self.results if r.status == "failed"]

    @property
    def summary_path(self) -> Path:
        return self.output / SUMMARY_FILE

    def lines(self) -> list[str]:
        """The summary printed at the end: totals, one line per rank, one line per failure."""
        out = [
            f"{self.total} {self.unit}: {len(self.done)} written, {len(self.skipped)} already complete (skipped), "
            f"{len(self.failed)} failed"
        ]
        for rank in range(self.world_size if self.results else 0):
            mine = [r for r in self.done if r.rank == rank]
            failed = sum(r.rank == rank for r in self.failed)
            seconds = sum(r.seconds for r in mine)
            rate = f", {60 * len(mine) / seconds:.1f} {self.unit}/min" if seconds > 0 else ""
            out.append(f"  rank {rank}: {len(mine)} written, {failed} failed{rate}")
        out += [f"  failed {r.name}: {r.error}" for r in self.failed]
        out.append(f"summary: {self.summary_path}")
        return out

    def save(self, config: RunConfig) -> None:
        """On rank zero only: the run's config and the full record beside the outputs."""
        if self.is_global_zero:
            write_text_atomic(self.output / "config.yaml", dump_config(config))
            self.write()

    def write(self) -> None:
        """Save the full record (every pair, its rank and status) as JSON beside the outputs."""
        record = {
            "total": self.total,
            "world_size": self.world_size,
            "skipped": self.skipped,
            "results": [asdict(r) for r in self.results],
        }
        write_text_atomic(self.summary_path, json.dumps(record, indent=1) + "\n")


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


def folder_strategy(config: RunConfig) -> str | ShardedStrategy:
    """``ShardedStrategy`` whenever the run may span several processes; plain ``auto`` on one device."""
    t = config.trainer
    one_device = str(t.devices) == "1" or (str(t.devices) == "auto" and t.accelerator == "cpu")
    if t.strategy == "auto" and one_device and t.num_nodes == 1:
        return "auto"
    return ShardedStrategy()


def check_folder_config(config: RunConfig) -> None:
    """Refuse what a folder run cannot honour, naming the key, before anything is written."""
    for key, used in UNSUPPORTED_KEYS.items():
        if used(config):
            raise ConfigError(f"{key} is not supported for folder runs; remove it, or run the images one by one")
    strategy = str(config.trainer.strategy)
    if strategy not in FOLDER_STRATEGIES:
        raise ConfigError(
            f"trainer.strategy={strategy} is not supported for folder runs (each rank optimises its own images); "
            "use auto or ddp"
        )


def plan_folder_memory(config: RunConfig, pairs: Sequence[Any], per_device: int) -> int:
    """The VGG blocks to checkpoint so the largest group fits; ResourceError when even that does not fit."""
    refuse_tiling(config, "folder runs")
    largest = max(pairs, key=lambda p: _pixels(p.content))
    try:
        content = read_size(largest.content)
        styles = [read_size(s) for s in largest.styles]
    except NSTError:  # unreadable images are reported per pair; plan with what can be read
        return 0 if config.features.checkpoint_blocks == "auto" else config.features.checkpoint_blocks
    blocks, _ = check_fits(config, content, styles, batch=min(per_device, len(pairs)))
    return blocks


def _pixels(path: str) -> int:
    try:
        h, w = read_size(path)
    except NSTError:
        return 0
    return h * w


def _stopped(stop: GracefulStop) -> RunInterrupted:
    signum = stop.signum if stop.signum is not None else signal.SIGINT
    saved = " and ".join(str(p) for p in stop.saved) or "nothing"
    err = RunInterrupted(
        f"interrupted by {signal.Signals(signum).name}; saved {saved}", signum, resumable=False
    )
    err.hint = "rerun the same command to continue: finished images are skipped, the interrupted group resumes"
    return err


def fit_batch(
    config: RunConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    verbose: bool = False,
) -> BatchReport:
    """Produce every content x style pair the config names, skipping outputs already complete.

    Writes ``OUTPUT/<content>__<style>.png`` per pair, ``config.yaml`` and ``batch-summary.json``;
    ``overwrite`` redoes complete pairs too. A running group is saved in ``OUTPUT/checkpoints`` every
    ``checkpoint.every_n_steps`` and on SIGINT/SIGTERM (RunInterrupted); a rerun continues it. Returns
    the report of all ranks.

    Lightning's start-up messages (accelerator lines, tips) and known deprecation notices are held back unless
    ``verbose``; logger levels and warning filters are as before once it returns.
    """
    with lightning_quiet(verbose):
        check_folder_config(config)
        pairs = expand_pairs(config)
        todo, complete = pending(pairs, overwrite)
        output = Path(config.output)
        if output.is_file():
            raise ConfigError(f"output {output} is a file; give a directory for the batch's images")
        skipped = [p.name for p in complete]
        checkpoints = output / "checkpoints"
        if not todo:
            output.mkdir(parents=True, exist_ok=True)
            report = BatchReport(output, len(pairs), skipped, [], is_global_zero=rank_zero_only.rank == 0)
        else:
            per_device = config.batch.images_per_device if config.optim.line_search == "none" else 1
            blocks = plan_folder_memory(config, todo, per_device)
            check_writable(output)  # after every refusal, before any work: a read-only or full disk is said at once
            features = config.features.model_copy(update={"checkpoint_blocks": blocks})
            stop = GroupStop()
            trainer = build_trainer(config, output, progress=False, callbacks=[stop, *(callbacks or [])], folder=True)
            if progress:
                trainer.callbacks.insert(0, ImagesProgressBar())
            module = build_module(config, None, None, masks=load_masks(config), init=init_input(config), features=features)
            module.group_checkpoint_every = config.checkpoint.every_n_steps
            data = StylePairsDataModule.from_config(config, todo, images_per_device=per_device)
            output.mkdir(parents=True, exist_ok=True)
            if overwrite:
                for old in checkpoints.glob("group-*.ckpt"):
                    old.unlink()
            remove_stale_temps(checkpoints)
            L.seed_everything(config.seed, workers=False, verbose=False)
            owned = not distributed_before()
            with stop.handling_signals():
                try:
                    trainer.fit(module, datamodule=data)
                except BaseException as err:
                    if stop.stopped_by_signal and GracefulStop.is_stop(err):
                        raise _stopped(stop) from None
                    if isinstance(err, NumericalError):
                        raise NumericalError(f"{err}; the group's last checkpoint is kept in {checkpoints}") from None
                    if is_write_failure(err):
                        kept = f"images already written are kept and a rerun skips them; the group's checkpoint is in {checkpoints}"
                        raise write_failure(err, kept, where=f"the folder's files in {output}") from None
                    if is_out_of_memory(err):
                        raise ResourceError(
                            f"out of memory with batch.images_per_device={per_device} at image.size={config.image.size}; "
                            "lower batch.images_per_device or image.size"
                        ) from None
                    raise
            results = gather_results(module.results, release=owned)
            report = BatchReport(output, len(pairs), skipped, results, trainer.world_size, trainer.is_global_zero)
        report.save(config)
        return report
