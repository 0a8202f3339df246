"""The Python API: ``fit(config)`` loads the images, builds the module and the Trainer, and runs.

The one place where config, images, features, module and Trainer are assembled; the CLI calls it.
With ``scales`` a run is several stages, coarse to fine: one ``Trainer.fit`` per stage at that
stage's size, each starting from the previous result upsampled, each checkpointing into
``checkpoints/stage{k}``, so ``resume="last"`` picks up the stage that was running.
"""

from __future__ import annotations

import shutil
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from .callbacks import (
    FinalImage,
    ImageSnapshots,
    LossHistory,
    RunPlots,
    StepCheckpoint,
    StepProgressBar,
    write_text_atomic,
)
from .config import INIT_KEYWORDS, RunConfig, dump_config
from .errors import CheckpointError, ConfigError
from .features import VGGFeatures
from .images import load_image, read_image, target_shape
from .module import FINGERPRINT_KEY, StyleTransferModule

RUN_FILES = ("config.yaml", "final.png", "losses.csv", "loss_curve.png", "side_by_side.png")
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


def load_images(config: RunConfig, size: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The content image at ``size`` (default ``image.size``) and each style image scaled by its ``style_scale``."""
    content = load_image(config.content, size or config.image.size, config.image.fit)
    long_side = max(content.shape[-2:])
    styles = [
        load_image(path, max(8, round(long_side * scale)), "long")
        for path, scale in zip(config.styles, config.style_scales())
    ]
    return content, styles


def load_masks(config: RunConfig) -> list[torch.Tensor | None] | None:
    """Each style's mask image at full size (the module fits it to the output), or None."""
    if config.style_masks is None:
        return None
    return [None if path is None else read_image(path) for path in config.style_masks]


def build_module(
    config: RunConfig,
    content: torch.Tensor,
    styles: list[torch.Tensor],
    *,
    masks: list[torch.Tensor | None] | None = None,
    init: str | torch.Tensor | None = None,
    extractor: VGGFeatures | None = None,
    target_cache: MutableMapping[str, Any] | None = None,
) -> StyleTransferModule:
    """The LightningModule for ``config`` and already loaded images (``init`` overrides ``config.init``)."""
    if init is None:
        init = config.init if config.init in INIT_KEYWORDS else load_image(config.init)
    return StyleTransferModule(
        content,
        styles,
        loss=config.loss,
        optim=config.optim,
        features=config.features,
        init=init,
        style_blend=config.style_blend,
        style_masks=masks,
        color=config.color,
        extractor=extractor,
        target_cache=target_cache,
        seed=config.seed,
    )


def build_trainer(
    config: RunConfig,
    outputs: RunOutputs,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    *,
    stage: Stage | None = None,
    shown: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
) -> L.Trainer:
    """A Trainer for ``stage`` (default: the whole single-scale run) writing checkpoints, snapshots, the loss
    history, the result so far as ``final.png`` and, given ``shown`` (the content and styles to show), the
    loss curve and side-by-side pictures under ``outputs``."""
    t = config.trainer
    stage = stage or plan_stages(config, outputs)[-1]
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
        own.append(RunPlots(outputs.root, outputs.losses, shown[0], shown[1], starts))
    if config.snapshot.every_n_steps:
        own.append(ImageSnapshots(outputs.snapshots, config.snapshot.every_n_steps, step_offset=stage.offset))
    if progress:
        label = "Stylising" if stage.count == 1 else f"Stage {stage.index + 1}/{stage.count} ({stage.size} px)"
        own.append(StepProgressBar(label))
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_steps=stage.steps,
        max_epochs=-1,
        log_every_n_steps=t.log_every_n_steps,
        logger=False,
        callbacks=own + list(callbacks or []),
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=outputs.root,
    )


def resolve_resume(resume: str | None, outputs: RunOutputs) -> Path | None:
    """``last`` means this run's ``checkpoints/last.ckpt``; anything else is a checkpoint path."""
    if resume is None:
        return None
    path = outputs.last_checkpoint if resume == "last" else Path(resume)
    if not path.is_file():
        hint = "run without --resume to start it" if resume == "last" else "give an existing .ckpt file or --resume last"
        raise CheckpointError(f"no checkpoint at {path}; {hint}")
    return path


def resume_point(config: RunConfig, resume: str | None, stages: list[Stage]) -> tuple[int, Path | None]:
    """The stage to start in and the checkpoint to resume it from.

    ``last`` in a multi-scale run is the ``last.ckpt`` of the latest stage that has one; a checkpoint
    path belongs to the stage whose image size it holds.
    """
    if resume is None:
        return 0, None
    if len(stages) == 1:
        return 0, resolve_resume(resume, RunOutputs(Path(config.output)))
    if resume == "last":
        for stage in reversed(stages):
            if stage.last_checkpoint.is_file():
                return stage.index, stage.last_checkpoint
        raise CheckpointError(f"no checkpoint in {stages[0].checkpoints.parent}/stage*/; run without --resume to start it")
    path = resolve_resume(resume, RunOutputs(Path(config.output)))
    shape = read_checkpoint(path).get(FINGERPRINT_KEY, {}).get("image_shape")
    if not shape:
        raise CheckpointError(f"checkpoint {path} was not written by nst-lightning; resume from a checkpoint of this run")
    full = read_image(config.content).shape[-2:]
    for stage in stages:
        if list(shape[-2:]) == list(target_shape(full[0], full[1], stage.size, config.image.fit)):
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


def prepare_output(config: RunConfig, outputs: RunOutputs, resuming: bool, overwrite: bool) -> None:
    """Create the run directory; refuse to clobber a previous run unless resuming or ``overwrite``."""
    root = outputs.root
    inputs = {Path(p).resolve() for p in [config.content, *config.styles, *(config.style_masks or [])] if p}
    if root.resolve() in inputs or root.is_file():
        raise ConfigError(f"output {root} is a file (an input image?); give a directory for the run's outputs")
    previous = outputs.config.exists() or outputs.checkpoints.exists()
    if previous and not resuming:
        if not overwrite:
            raise ConfigError(
                f"output {root} holds a previous run; add --resume last to continue it, "
                "--overwrite to replace it, or choose another --output"
            )
        for name in RUN_FILES:
            (root / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(root / name, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def fit(
    config: RunConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    extractor: VGGFeatures | None = None,
    target_cache: MutableMapping[str, Any] | None = None,
) -> RunOutputs:
    """Run one style transfer as ``config`` describes; returns where its files are.

    ``resume``: ``"last"`` or a checkpoint path continues that optimisation (in its stage, then the
    later stages); ``overwrite`` replaces a previous run in the same output directory. ``extractor`` and
    ``target_cache`` let several runs (a sweep) share the loaded network and the computed targets.
    """
    outputs = RunOutputs(Path(config.output))
    stages = plan_stages(config, outputs)
    start, ckpt_path = resume_point(config, resume, stages)
    masks = load_masks(config)
    L.seed_everything(config.seed, workers=False, verbose=False)
    init: str | torch.Tensor | None = None
    for stage in stages[start:]:
        content, styles = load_images(config, stage.size)
        module = build_module(
            config, content, styles, masks=masks, init=init, extractor=extractor, target_cache=target_cache
        )
        extractor = module.extractor
        resuming = ckpt_path if stage.index == start else None
        if stage.index == start:
            if ckpt_path is not None:
                module.check_checkpoint(read_checkpoint(ckpt_path))
            prepare_output(config, outputs, resuming=ckpt_path is not None, overwrite=overwrite)
            write_text_atomic(outputs.config, dump_config(config))
        trainer = build_trainer(config, outputs, progress=progress, callbacks=callbacks, stage=stage, shown=(content, styles))
        trainer.fit(module, ckpt_path=resuming)
        if trainer.should_stop or trainer.global_step < stage.steps:
            break  # asked to stop: later stages wait for a resume
        init = module.optimised_image()
    return outputs
