"""Folder runs: many content x style pairs, several images per device, sharded over devices and nodes.

The engine is the single run's ``StyleTransferModule`` trained by ``Trainer.fit``: ``StylePairsDataModule``
feeds it groups of same-size pairs step by step, and it writes each image to its pair's file when its group
ends. Lightning's launcher (``devices``, ``num_nodes``, ``strategy``; SLURM and torchrun detected) runs it
on every rank; each rank takes its own groups and ``ShardedStrategy`` keeps DDP from averaging gradients or
broadcasting images between ranks (``nst_lightning.groups``). ``runs.run_folder`` assembles it from a config;
this module holds its pieces: what a folder run refuses, its memory plan, its progress bars and the report of
what every rank produced.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from .atomic import write_text_atomic
from .config import RunConfig, dump_config
from .data import GroupStep, PairResult
from .errors import ConfigError, NSTError
from .groups import FOLDER_STRATEGIES, ShardedStrategy, check_folder_strategy, gather_results
from .images import read_size
from .kinds import FOLDER_SUMMARY
from .resources import Plan, plan_run

SUMMARY_FILE = FOLDER_SUMMARY
UNSUPPORTED_KEYS = {
    "scales": lambda c: c.scales is not None,
    "features.onnx": lambda c: c.features.onnx is not None,
}
"""Single-run keys a folder run does not honour: it is refused naming them instead of silently ignoring them."""

__all__ = ["FOLDER_STRATEGIES", "BatchReport", "PairResult", "ShardedStrategy", "gather_results"]


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
            "unit": self.unit,
            "world_size": self.world_size,
            "skipped": self.skipped,
            "results": [asdict(r) for r in self.results],
        }
        write_text_atomic(self.summary_path, json.dumps(record, indent=1) + "\n")


def check_folder_config(config: RunConfig) -> None:
    """Refuse what a folder run cannot honour, naming the key, before anything is written."""
    for key, used in UNSUPPORTED_KEYS.items():
        if used(config):
            raise ConfigError(f"{key} is not supported for folder runs; remove it, or run the images one by one")
    check_folder_strategy(config, "folder runs (each rank optimises its own images)")


def images_per_device(config: RunConfig) -> int:
    """The largest group of images optimised together on one device: ``batch.images_per_device``, or one when a line
    search (a per-image decision) runs."""
    return config.batch.images_per_device if config.optim.line_search == "none" else 1


def largest_pair(pairs: Sequence[Any], size: Callable[[str], tuple[int, int]] = read_size) -> Any:
    """The pair whose content has the most pixels by ``size`` (its header: an image's, or a clip's frames with
    ``videoio.frame_size``; unreadable ones count as none, reported when their turn comes): it sets the memory."""
    return max(pairs, key=lambda p: _pixels(p.content, size))


def plan_folder_memory(config: RunConfig, pairs: Sequence[Any], per_device: int) -> Plan | None:
    """The memory plan (checkpointed blocks, tile, L-BFGS history) every group runs with, set by the largest
    group: ``per_device`` images of the largest content; ResourceError when even that does not fit, None when
    no content can be read (each pair is then reported failed as its turn comes)."""
    largest = largest_pair(pairs)
    try:
        content = read_size(largest.content)
        styles = [read_size(s) for s in largest.styles]
    except NSTError:
        return None
    return plan_run(config, content, styles, batch=min(per_device, len(pairs)))


def _pixels(path: str, size: Callable[[str], tuple[int, int]] = read_size) -> int:
    try:
        h, w = size(path)
    except NSTError:
        return 0
    return h * w
