"""A run's output folder: where its files are, its coarse-to-fine stages, resuming and preparing it.

Knows nothing of the Trainer: it reads checkpoints only to find the step and image size they hold.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import remove_stale_temps, reporting_write_failures
from .config import INIT_KEYWORDS, RunConfig
from .errors import CheckpointError, ConfigError
from .images import read_size, target_shape
from .kinds import HeldKind, held_kind
from .groups import FINGERPRINT_KEY

RUN_FILES = ("config.yaml", "final.png", "interrupted.png", "losses.csv", "loss_curve.png", "side_by_side.png")
RUN_DIRS = ("checkpoints", "snapshots")


@dataclass(frozen=True)
class RunOutputs:
    """Where a run's files are."""

    root: Path

    @property
    def final(self) -> Path:
        return self.root / "final.png"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def interrupted(self) -> Path:
        """The image saved when a run stops early (signal or failure); final.png only ever holds a finished run."""
        return self.root / "interrupted.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def losses(self) -> Path:
        return self.root / "losses.csv"

    @property
    def loss_curve(self) -> Path:
        return self.root / "loss_curve.png"

    @property
    def side_by_side(self) -> Path:
        return self.root / "side_by_side.png"


@dataclass(frozen=True)
class Stage:
    """One coarse-to-fine stage: its output size, steps, the steps before it, where it checkpoints."""

    index: int
    count: int
    size: int
    steps: int
    offset: int
    checkpoints: Path

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"


def plan_stages(config: RunConfig, outputs: RunOutputs) -> list[Stage]:
    """The stages of ``config``; a single-scale run is one stage checkpointing into ``checkpoints/``."""
    sizes = config.stages()
    out, offset = [], 0
    for k, (size, steps) in enumerate(sizes):
        where = outputs.checkpoints if len(sizes) == 1 else outputs.checkpoints / f"stage{k + 1}"
        out.append(Stage(k, len(sizes), size, steps, offset, where))
        offset += steps
    return out


_NO_CHECKPOINT = (
    "the run in {root} stopped before its first checkpoint, so there is nothing to resume; "
    "start it again with overwrite=True"
)


def resolve_resume(resume: str | None, outputs: RunOutputs) -> Path | None:
    """``last`` means this run's ``checkpoints/last.ckpt``; anything else is a checkpoint path."""
    if resume is None:
        return None
    path = outputs.last_checkpoint if resume == "last" else Path(resume)
    if not path.is_file():
        others = sorted(outputs.checkpoints.glob("*.ckpt")) if resume == "last" and outputs.checkpoints.is_dir() else []
        if others:
            raise CheckpointError(f"no checkpoint at {path}; resume from another of the run's: resume=\"{others[-1]}\"")
        if resume == "last" and holds_run(outputs):
            raise CheckpointError(f"no checkpoint at {path}: {_NO_CHECKPOINT.format(root=outputs.root)}")
        hint = "run without resume= to start it" if resume == "last" else 'give an existing .ckpt file or resume="last"'
        raise CheckpointError(f"no checkpoint at {path}; {hint}")
    return path


KIND_NAMES: dict[str, str] = {
    "image": "a single-image run",
    "folder": "a run over a folder of images",
    "clip": "a clip run",
    "clips": "a run over a folder of clips",
    "sweep": "a sweep",
}
CONTINUE_HELD: dict[str, str] = {
    "image": 'continue it with the command that started it and resume="last"',
    "clip": 'continue it with the command that started it and resume="last"',
    "folder": "continue it by running the command that started it again (finished images are skipped)",
    "clips": "continue it by running the command that started it again (finished clips are skipped)",
    "sweep": "continue it with the nst-lightning sweep command that started it and resume=True",
}


def check_run_kind(root: Path, kind: HeldKind) -> None:
    """Refuse an output folder holding another kind of run, whatever resume= or overwrite=True say: resuming
    finds nothing of this kind there, and replacing would remove only this kind's files and mix the rest in."""
    held = held_kind(root)
    if held is None or held == kind:
        return
    raise ConfigError(
        f"output {root} holds {KIND_NAMES[held]}, not {KIND_NAMES[kind]}; {CONTINUE_HELD[held]}, or choose another "
        "output= directory (overwrite=True replaces only a run of the same kind)"
    )


def holds_run(outputs: RunOutputs) -> bool:
    """Whether the folder holds any file or folder a run writes."""
    return any((outputs.root / name).exists() for name in (*RUN_FILES, *RUN_DIRS))


def has_checkpoint(outputs: RunOutputs) -> bool:
    """Whether the run has written any checkpoint (in any stage)."""
    return outputs.checkpoints.is_dir() and any(outputs.checkpoints.rglob("*.ckpt"))


def check_resume_step(path: Path, stage: Stage) -> None:
    """Refuse a checkpoint past the stage's configured steps: resuming it would run nothing yet rewrite the run."""
    step = checkpoint_step(path)
    if step is None or step <= stage.steps:
        return
    what = "trainer.max_steps" if stage.count == 1 else f"stage {stage.index + 1}'s steps (scale_steps)"
    raise CheckpointError(
        f"checkpoint {path} is at step {step}, past {what}={stage.steps}; set it to {step} or more to continue "
        "the run, or use overwrite=True to start again with fewer steps"
    )


def resume_point(config: RunConfig, resume: str | None, stages: list[Stage]) -> tuple[int, Path | None]:
    """The stage to start in and the checkpoint to resume it from.

    ``last`` in a multi-scale run is the ``last.ckpt`` of the latest stage that has one; a checkpoint
    path belongs to the stage whose image size it holds.
    """
    if resume is None:
        return 0, None
    start, path = _find_resume(config, resume, stages)
    check_resume_step(path, stages[start])
    return start, path


def _find_resume(config: RunConfig, resume: str, stages: list[Stage]) -> tuple[int, Path]:
    outputs = RunOutputs(Path(config.output))
    if len(stages) == 1:
        return 0, resolve_resume(resume, outputs)
    if resume == "last":
        for stage in reversed(stages):
            if stage.last_checkpoint.is_file():
                return stage.index, stage.last_checkpoint
        if holds_run(outputs):
            raise CheckpointError(f"no checkpoint in {outputs.checkpoints}/stage*/: {_NO_CHECKPOINT.format(root=outputs.root)}")
        raise CheckpointError(f"no checkpoint in {outputs.checkpoints}/stage*/; run without resume= to start it")
    path = resolve_resume(resume, outputs)
    shape = read_checkpoint(path).get(FINGERPRINT_KEY, {}).get("image_shape")
    if not shape:
        raise CheckpointError(f"checkpoint {path} was not written by nst-lightning; resume from a checkpoint of this run")
    full = read_size(config.content)
    for stage in stages:
        if list(shape[-2:]) == list(target_shape(full[0], full[1], stage.size, config.image.fit, config.image.rounding)):
            return stage.index, path
    raise CheckpointError(
        f"checkpoint {path} holds a {shape[-1]}x{shape[-2]} image, which is none of this run's scales "
        f"{config.scales}; resume with the scales it was written with"
    )


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint file for inspection, with a one-line error when it is not one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(err).__name__}); it is corrupt or not a Lightning checkpoint, "
            "resume from another one in the run's checkpoints/ folder"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint; resume from a .ckpt written by nst-lightning")
    return checkpoint


def input_paths(config: RunConfig) -> list[Path]:
    """Every file the run reads: content, styles, style masks, an init image and a weights file."""
    paths = [config.content, *config.styles, *(p for p in config.style_masks or [] if p)]
    if config.init not in INIT_KEYWORDS:
        paths.append(config.init)
    if config.features.weights not in ("caffe", "torchvision"):
        paths.append(config.features.weights)
    return [Path(p).expanduser().resolve() for p in paths]


def check_inputs_outside(inputs: Sequence[str | Path], root: Path, written: Sequence[Path], what: str) -> None:
    """Refuse an input that lies where a run writes: its folder ``root``, one of the ``written`` files or folders, or
    inside one of them; ``what`` names the run and its typical outputs in the message."""
    root = root.expanduser().resolve()
    places = [w.expanduser().resolve() for w in written]
    for entry in inputs:
        path = Path(entry).expanduser().resolve()
        if path == root or any(path == w or path.is_relative_to(w) for w in places):
            raise ConfigError(
                f"input {path} is where {what} and would be overwritten; choose another output= directory or move the input"
            )


RESUME_AND_OVERWRITE = (
    "resume= continues the run and overwrite=True replaces it; give resume= to continue it or overwrite=True to start "
    "again, not both"
)


def check_output(config: RunConfig, outputs: RunOutputs, resuming: bool, overwrite: bool) -> None:
    """Refuse an output directory that would overwrite or delete an input, or clobber a previous run."""
    written = [outputs.root / name for name in (*RUN_FILES, *RUN_DIRS)]
    check_inputs_outside(input_paths(config), outputs.root, written, "the run writes its outputs (final.png, snapshots/, ...)")
    if resuming and overwrite:
        raise ConfigError(RESUME_AND_OVERWRITE)
    if holds_run(outputs) and not resuming and not overwrite:
        if not has_checkpoint(outputs):
            raise ConfigError(
                f"output {outputs.root} holds a run that stopped before its first checkpoint (nothing to resume); "
                "add overwrite=True to start it again, or choose another output= directory"
            )
        raise ConfigError(
            f'output {outputs.root} holds a previous run; add resume="last" to continue it, '
            "overwrite=True to replace it, or choose another output= directory"
        )


def prepare_output(outputs: RunOutputs, resuming: bool, overwrite: bool) -> None:
    """Create the run directory; with ``overwrite`` (and not resuming) remove a previous run's files first.

    Temporary files that a killed run left half-written are removed; finished files are never touched.
    """
    root = outputs.root
    with reporting_write_failures("the run's output folder must be writable"):
        root.mkdir(parents=True, exist_ok=True)
        if overwrite and not resuming:
            for name in RUN_FILES:
                (root / name).unlink(missing_ok=True)
            for name in RUN_DIRS:
                if (root / name).exists():
                    shutil.rmtree(root / name)
        remove_stale_temps(root, RUN_FILES)
        for name in RUN_DIRS:
            remove_stale_temps(root / name)


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint holds (read memory-mapped, so a large file costs nothing); None if it is unreadable."""
    if not path.is_file():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # unreadable for any reason: report it as no checkpoint, never fail the report itself
        return None
