"""Everything around ``Trainer.fit``, once for every run kind: quiet start-up, the output checks, the memory plan,
the seed, the Trainer, signals and the translation of a failure into one user-facing error.

``runs`` composes these into the single, folder and clip runs; none of them repeats a step here.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from .atomic import is_write_failure, write_failure
from .callbacks import FinalImage, ImageSnapshots, LossHistory, RunPlots, StepCheckpoint, StepProgressBar
from .config import RunConfig
from .errors import ConfigError, NSTError, NumericalError, ResourceError, RunInterrupted
from .faults import AtomicCheckpointIO, GracefulStop, StopSignal, stopping_on_signals
from .groups import folder_strategy
from .hardware import cuda_run, resolve_precision
from .lock import FolderLock
from .quiet import lightning_quiet
from .resources import is_out_of_memory
from .kinds import CLIP_RECORD, RunKind, held_kind
from .rundir import RunOutputs, Stage, check_run_kind, checkpoint_step, has_checkpoint, plan_stages


@contextmanager
def session(output: Path, kind: RunKind, what: str, verbose: bool = False) -> Iterator[None]:
    """A run's frame: Lightning's start-up lines and known notices held back unless ``verbose`` (levels and
    filters restored on exit), an ``output`` that is a file (``what`` names what goes there) or holds another
    ``kind`` of run refused, and the folder's lock held, so a second run on the same folder is refused and the checks made inside still hold
    when files are written. Under DDP rank zero holds it: Lightning's launcher starts the other ranks from
    inside rank zero's ``fit``, after its checks, and they write only what their groups or clips produce."""
    with lightning_quiet(verbose), ExitStack() as held:
        if output.is_file():
            hint = " (an input image?)" if what == "the run's outputs" else ""
            raise ConfigError(f"output {output} is a file{hint}; give a directory for {what}")
        check_run_kind(output, kind)
        if rank_zero_only.rank == 0:
            held.enter_context(FolderLock(output))
        try:
            with stopping_on_signals():
                yield
        except StopSignal as err:
            raise stopped_between_steps(output, kind, err.signum) from None


RERUN_FOLDER = "rerun the same command to continue: finished images are skipped, the interrupted group resumes"
RERUN_CLIPS = "rerun the same command to continue: finished clips are skipped, this one resumes at its frame"
NOTHING_WRITTEN = "nothing was written yet; run the same command again"


def stopped_between_steps(output: Path, kind: RunKind, signum: int) -> RunInterrupted:
    """The error of a run of ``kind`` stopped by a signal outside a step (loading, between frames or stages): every
    file on disk is whole, and how to go on depends on what the folder holds by then."""
    name = signal.Signals(signum).name
    if kind in ("folder", "clips"):
        err = RunInterrupted(f"interrupted by {name} between steps; files already written are kept", signum, resumable=False)
        err.hint = RERUN_FOLDER if kind == "folder" else RERUN_CLIPS
        return err
    if kind == "clip":
        where, resumable = f"between frames; the frames finished before it are kept in {output}", (output / CLIP_RECORD).is_file()
    else:
        outputs = RunOutputs(output)
        where, resumable = "between steps; the files written so far are intact", has_checkpoint(outputs)
    err = RunInterrupted(f"interrupted by {name} {where}", signum, resumable=resumable)
    if not resumable and held_kind(output) is None:
        err.hint = NOTHING_WRITTEN
    return err


def seed(config: RunConfig) -> None:
    """Seed every generator the run draws from (the noise init, any random choice in torch) with ``seed``."""
    L.seed_everything(config.seed, workers=False, verbose=False)


def build_trainer(
    config: RunConfig,
    outputs: RunOutputs | Path,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    *,
    stage: Stage | None = None,
    shown: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
    folder: bool = False,
    label: str | None = None,
) -> L.Trainer:
    """The Trainer of every run.

    A single run (or ``stage`` of one) writes checkpoints, snapshots, the loss history, the result so far as
    ``final.png`` and, given ``shown`` (the content and styles to show), the loss curve and side-by-side
    pictures under ``outputs``. One image is one optimisation on one device: ``devices: auto`` means one
    here, and several devices or nodes are refused (DDP would average one image's gradients across ranks).
    A ``folder`` run spreads its groups over every device and node, each rank on its own images
    (``ShardedStrategy``); its callbacks write the images and group checkpoints.
    """
    t = config.trainer
    if config.optim.cuda_graph is True and not cuda_run(t.accelerator):
        raise ConfigError(
            f"optim.cuda_graph=true needs a CUDA device, but this run has none (trainer.accelerator={t.accelerator}); "
            "set optim.cuda_graph=auto, or run on a machine with a CUDA GPU"
        )
    outputs = outputs if isinstance(outputs, RunOutputs) else RunOutputs(Path(outputs))
    own: list[Callback] = []
    if folder:
        devices, strategy, max_steps = t.devices, folder_strategy(config), -1
    else:
        devices, strategy = (1 if t.devices == "auto" else t.devices), t.strategy
        if _device_count(devices) != 1 or t.num_nodes > 1:
            raise ConfigError(
                f"a single image is optimised on one device, but trainer.devices={t.devices}, "
                f"trainer.num_nodes={t.num_nodes}; set trainer.devices=1, or give a folder, glob or list of content "
                "images to spread a batch over devices and nodes"
            )
        stage = stage or plan_stages(config, outputs)[-1]
        max_steps = stage.steps
        own = _run_callbacks(config, outputs, stage, shown, progress, label)
    try:
        return L.Trainer(
            accelerator=t.accelerator,
            devices=devices,
            num_nodes=t.num_nodes,
            strategy=strategy,
            precision=resolve_precision(t.precision, t.accelerator),
            max_steps=max_steps,
            max_epochs=1 if folder else -1,
            log_every_n_steps=t.log_every_n_steps,
            logger=False,
            callbacks=own + list(callbacks or []),
            plugins=[AtomicCheckpointIO()],
            enable_checkpointing=not folder,
            enable_progress_bar=progress and not folder,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            default_root_dir=outputs.root,
        )
    except Exception as err:  # Lightning validates accelerator, devices, strategy here, each with its own type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"Lightning rejects trainer settings (accelerator={t.accelerator}, devices={t.devices}, "
            f"strategy={t.strategy}): {first}; fix the trainer section"
        ) from None


def _run_callbacks(
    config: RunConfig,
    outputs: RunOutputs,
    stage: Stage,
    shown: tuple[torch.Tensor, list[torch.Tensor]] | None,
    progress: bool,
    label: str | None = None,
) -> list[Callback]:
    """What a single run writes: checkpoints, the loss history, final.png, plots, snapshots; its progress bar
    (named ``label``, by default after the stage)."""
    ckpt = StepCheckpoint(
        dirpath=stage.checkpoints,
        filename="step-{step:06d}",
        every_n_train_steps=config.checkpoint.every_n_steps,
        save_top_k=-1 if config.checkpoint.keep_all else 1,
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    own: list[Callback] = [ckpt, LossHistory(outputs.losses, step_offset=stage.offset), FinalImage(outputs.final)]
    if shown is not None:
        starts = [s.offset for s in plan_stages(config, outputs)[1 : stage.index + 1]]
        own.append(RunPlots(outputs.losses, outputs.loss_curve, outputs.side_by_side, shown[0], shown[1], starts))
    if config.snapshot.every_n_steps:
        own.append(ImageSnapshots(outputs.snapshots, config.snapshot.every_n_steps, step_offset=stage.offset))
    if progress:
        if label is None:
            label = "Stylising" if stage.count == 1 else f"Stage {stage.index + 1}/{stage.count} ({stage.size} px)"
        own.append(StepProgressBar(label))
    return own


def _device_count(devices: int | str | list[int]) -> int:
    """How many devices a Trainer ``devices`` value asks for (-1 or "-1": all, counted as many)."""
    if isinstance(devices, list):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text.lstrip("-").isdigit():
        n = int(text)
        return 2 if n < 0 else n
    return 1


def interrupted(
    stop: GracefulStop, where: str = "", kept: str | None = None, rerun: str | None = None, resumable: bool | None = None
) -> RunInterrupted:
    """The error of a fit stopped by a signal: which signal, ``where`` (e.g. ``at step 3``) and what was ``kept``.

    Without ``kept`` it reports what the stop saved, and a second signal (stopped at once) as such. A checkpoint the
    stop wrote makes it resumable unless ``resumable`` says otherwise; ``rerun`` instead tells how a rerun of the
    same command continues (runs of many images or clips).
    """
    signum = stop.signum if stop.signum is not None else signal.SIGINT
    step = checkpoint_step(stop.checkpoint_path) if stop.checkpoint_path.name else None
    if kept is None and stop.at_once:
        saved = " and ".join(str(p) for p in stop.saved) or "nothing"
        held = f"; {stop.checkpoint_path} holds step {step}" if step is not None else ""
        summary = f"stopped at once by a second signal during step {(stop.step or 0) + 1}; saved {saved}{held}"
    else:
        kept = kept if kept is not None else "saved " + (" and ".join(str(p) for p in stop.saved) or "nothing")
        summary = f"interrupted by {signal.Signals(signum).name}{' ' + where if where else ''}; {kept}"
    if resumable is None:
        resumable = rerun is None and step is not None
    err = RunInterrupted(summary, signum, resumable=resumable)
    if rerun is not None:
        err.hint = rerun
    return err


@dataclass
class Failure:
    """What a failed fit says beyond its cause: ``kept`` (what is on disk, read once the fit has failed),
    ``out_of_memory`` (the fix for running out), ``files`` (where a failed write was), ``stopped`` (the
    RunInterrupted of a signal)."""

    kept: Callable[[], str]
    out_of_memory: Callable[[], str]
    files: str
    stopped: Callable[[], RunInterrupted]


def translate(err: BaseException, stop: GracefulStop, failure: Failure) -> NSTError | None:
    """The one user-facing error for a fit that raised ``err``; None when it is nothing foreseen."""
    if stop.stopped_by_signal and GracefulStop.is_stop(err):
        return failure.stopped()
    if isinstance(err, NumericalError):
        return NumericalError(f"{err}; {failure.kept()}")
    if is_out_of_memory(err):
        return ResourceError(failure.out_of_memory())
    if is_write_failure(err):
        return write_failure(err, failure.kept(), where=failure.files)
    return None


def fit(trainer: L.Trainer, module: L.LightningModule, stop: GracefulStop, failure: Failure, **kwargs: Any) -> None:
    """``trainer.fit(module, **kwargs)`` with SIGINT and SIGTERM routed to ``stop`` and a failure raised as the
    one error ``translate`` gives (anything unforeseen as it came)."""
    with stop.handling_signals():
        try:
            trainer.fit(module, **kwargs)
        except BaseException as err:
            known = translate(err, stop, failure)
            if known is None:
                raise
            raise known from None
