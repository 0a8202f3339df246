"""Folder runs of clips: every clip x style pair stylised by ``fit_clip``, the clips sharded over ranks.

A clip's frames depend on each other, so a clip is never split: rank r of N takes clips r, r+N, ... and
stylises each on its own device with the single-clip code (one Trainer per frame). Lightning Fabric starts
the ranks (``trainer.devices``, ``num_nodes``; torchrun and SLURM detected) and gathers what each did; each
clip writes ``OUTPUT/<clip>__<style>/stylised.mp4`` and its frames. A rerun skips finished clips and
continues an unfinished one at its first unfinished frame.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.fabric import Fabric
from lightning.pytorch.callbacks import Callback

from .atomic import check_writable
from .batch import FOLDER_STRATEGIES, BatchReport, distributed_before, gather_results
from .config import RunConfig
from .data import PairResult
from .errors import ConfigError, NSTError, RunInterrupted
from .flow import require_opencv
from .pairs import Pair, expand_pairs
from .quiet import lightning_quiet
from .video import ClipOutputs, check_clip_config, fit_clip

__all__ = ["fit_clips"]


def finished(pair: Pair) -> bool:
    """A clip is finished when its video is written and its work folder removed (the last thing ``fit_clip`` does)."""
    outputs = ClipOutputs(Path(pair.output))
    return outputs.video.is_file() and outputs.record.is_file() and not outputs.work.exists()


def clip_config(config: RunConfig, pair: Pair, rank_devices: Any) -> RunConfig:
    """The single-clip config of one pair, on this rank's one device."""
    trainer = config.trainer.model_copy(update={"devices": rank_devices, "num_nodes": 1, "strategy": "auto"})
    style: str | list[str] = pair.styles[0] if len(pair.styles) == 1 else list(pair.styles)
    return config.model_copy(update={"content": pair.content, "style": style, "output": pair.output, "trainer": trainer})


def fit_clips(
    config: RunConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    verbose: bool = False,
) -> BatchReport:
    """Stylise every clip x style pair the config names; finished clips are skipped unless ``overwrite``.

    A clip that cannot be read or stylised is reported failed (one line) and the others go on. Returns the
    report of all ranks; rank zero writes ``OUTPUT/batch-summary.json`` and ``OUTPUT/config.yaml``.

    Lightning's start-up messages are held back unless ``verbose``.
    """
    with lightning_quiet(verbose):
        check_clip_config(config, None)
        pairs = expand_pairs(config, clips=True)
        output = Path(config.output)
        if output.is_file():
            raise ConfigError(f"output {output} is a file; give a directory for the clips' outputs")
        skipped = [] if overwrite else [p.name for p in pairs if finished(p)]
        todo = [p for p in pairs if p.name not in skipped]
        require_opencv()
        check_writable(output)
        t = config.trainer
        fabric = Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=_strategy(config))
        results = fabric.launch(_run_shard, config, todo, overwrite, progress, callbacks, not distributed_before())
        report = BatchReport(output, len(pairs), skipped, results, fabric.world_size, fabric.is_global_zero, unit="clips")
        report.save(config)
        return report


def _strategy(config: RunConfig) -> str:
    """``ddp`` (processes and a process group, nothing wrapped: see ``_run_shard``) unless the run is one device."""
    strategy = str(config.trainer.strategy)
    if strategy not in FOLDER_STRATEGIES:
        raise ConfigError(
            f"trainer.strategy={strategy} is not supported for clip folders (each rank stylises whole clips); use auto or ddp"
        )
    return strategy


def _run_shard(
    fabric: Fabric,
    config: RunConfig,
    todo: list[Pair],
    overwrite: bool,
    progress: bool,
    callbacks: list[Callback] | None,
    release: bool,
) -> list[PairResult]:
    """This rank's clips, one after another; every rank's results gathered on every rank (``release``: the
    process group was made for this run and is closed after the gather)."""
    rank, world = fabric.global_rank, fabric.world_size
    devices: Any = [fabric.local_rank] if fabric.device.type == "cuda" else 1
    results = []
    mine = todo[rank::world]
    for number, pair in enumerate(mine, 1):
        start = time.perf_counter()
        outputs = ClipOutputs(Path(pair.output))
        resume = "last" if outputs.record.is_file() and not overwrite else None
        try:
            fit_clip(
                clip_config(config, pair, devices), resume=resume, overwrite=overwrite, progress=progress and rank == 0,
                callbacks=callbacks, label=f"clip {number}/{len(mine)} {pair.name}",
            )
            status, error = ("done", None) if finished(pair) else ("failed", "stopped by a callback before its last frame")
        except RunInterrupted as err:
            stopped = RunInterrupted(err.summary, err.signum, resumable=False)
            stopped.hint = "rerun the same command to continue: finished clips are skipped, this one resumes at its frame"
            raise stopped from None
        except NSTError as err:
            status, error = "failed", str(err)
        results.append(
            PairResult(pair.name, pair.content, list(pair.styles), pair.output, rank, status, error, None, time.perf_counter() - start)
        )
    return gather_results(results, release=release)

