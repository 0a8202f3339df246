"""The Python API: ``fit(config)`` loads the images, builds the module and the Trainer, and runs.

The one place where config, images, features, module and Trainer are assembled; the CLI calls it.
Folder runs (``nst_lightning.batch``) and sweeps use the same builders; ONNX export and validation of a
config's extractor are in ``nst_lightning.export``.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from .atomic import is_write_failure, reporting_write_failures, write_failure, write_text_atomic
from .callbacks import FinalImage, ImageSnapshots, LossHistory, RunPlots, StepCheckpoint, StepProgressBar
from .config import INIT_KEYWORDS, FeaturesConfig, RunConfig, dump_config
from .errors import ConfigError, NSTError, NumericalError, ResourceError, RunInterrupted
from .export import onnx_targets
from .faults import AtomicCheckpointIO, GracefulStop
from .features import VGGFeatures
from .hardware import cuda_run, resolve_precision
from .images import Loading, frame_count, load_image, load_style, read_image, read_size, style_side, target_shape
from .lock import FolderLock
from .losses import TemporalTarget
from .module import StyleTransferModule
from .pairs import is_batch, is_clip, is_clip_batch
from .quiet import lightning_quiet
from .resources import Shape, check_fits, is_out_of_memory, out_of_memory_message
from .rundir import (
    RunOutputs,
    Stage,
    check_output,
    checkpoint_step,
    plan_stages,
    prepare_output,
    read_checkpoint,
    resume_point,
)

log = logging.getLogger(__name__)

def load_images(config: RunConfig, size: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The content image at ``size`` (default ``image.size``) and each style image scaled by its ``style_scale``."""
    loading = Loading(**config.image.loading())
    content = load_image(config.content, size or config.image.size, config.image.fit, loading)
    shape = tuple(content.shape[-2:])
    styles = [load_style(path, shape, scale, loading) for path, scale in zip(config.styles, config.style_scales())]
    return content, styles


def load_masks(config: RunConfig) -> list[torch.Tensor | None] | None:
    """Each style's mask image at full size (the module fits it to the output), or None."""
    if config.style_masks is None:
        return None
    return [None if path is None else read_image(path) for path in config.style_masks]


def init_input(config: RunConfig) -> str | torch.Tensor:
    """``config.init`` as the module takes it: a keyword (content, noise, style) or the loaded image."""
    if config.init in INIT_KEYWORDS:
        return config.init
    if not Path(config.init).exists():
        raise ConfigError(
            f"init {config.init!r} is none of {', '.join(INIT_KEYWORDS)} and no image exists at that path; "
            "set init to content, noise, style or an image file"
        )
    return load_image(config.init)


UPSCALE_WARNING = 2.0
"""An input enlarged more than this many times is reported: the run sees a blurred, blocky image."""


def input_warnings(config: RunConfig) -> list[str]:
    """One line per input the run will use in a way the user may not expect: animated (first frame used),
    enlarged many times over, or a style mask stretched to other proportions than the output's."""
    out = []
    for role, path in [("content", config.content), *(("style", p) for p in config.styles)]:
        frames = frame_count(path)
        if frames > 1:
            out.append(f"{role} image {path} has {frames} frames (animated or multi-page); only the first is used")
    height, width = read_size(config.content)
    side = {"long": max(height, width), "short": min(height, width), "height": height, "width": width}[config.image.fit]
    if config.image.size > UPSCALE_WARNING * side:
        out.append(
            f"content image {config.content} is {width}x{height} px and is enlarged {config.image.size / side:.0f}x to "
            f"image.size={config.image.size}; the result will look blurred, so give a larger image or a smaller image.size"
        )
    shape = target_shape(height, width, config.image.size, config.image.fit, config.image.rounding)
    for path, scale in zip(config.styles, config.style_scales()):
        long_side, wanted = max(read_size(path)), style_side(shape, scale)
        if wanted > UPSCALE_WARNING * long_side:
            out.append(
                f"style image {path} is {long_side} px on its long side and is enlarged {wanted / long_side:.0f}x; "
                "its texture will look blurred, so give a larger style image or a smaller image.style_scale"
            )
    for path in [p for p in config.style_masks or [] if p]:
        mh, mw = read_size(path)
        if abs(mw / mh - width / height) > 0.01 * (width / height):
            out.append(
                f"style mask {path} is {mw}x{mh} but the content is {width}x{height}; the mask is stretched to the "
                "output's proportions, so crop it to the content's to place the style exactly"
            )
    return out


def build_module(
    config: RunConfig,
    content: torch.Tensor | None,
    styles: list[torch.Tensor] | None,
    *,
    masks: list[torch.Tensor | None] | None = None,
    init: str | torch.Tensor | None = None,
    extractor: VGGFeatures | None = None,
    target_cache: MutableMapping[str, Any] | None = None,
    features: FeaturesConfig | None = None,
    temporal: TemporalTarget | None = None,
) -> StyleTransferModule:
    """The LightningModule for ``config`` and already loaded images (``init`` and ``features`` override the config's);
    without images, a module for a folder run, fed by ``StylePairsDataModule``. ``temporal`` adds the temporal
    term of a clip's frame (see ``nst_lightning.video``)."""
    return StyleTransferModule(
        content,
        styles,
        loss=config.loss,
        optim=config.optim,
        features=features or config.features,
        init=init_input(config) if init is None else init,
        style_blend=config.style_blend,
        style_masks=masks,
        color=config.color,
        extractor=extractor,
        target_cache=target_cache,
        seed=config.seed,
        temporal=temporal,
        grow_checkpoint_blocks=config.features.checkpoint_blocks == "auto",
    )


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
    (``ShardedStrategy``); its module writes the images and group checkpoints itself.
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
        from .batch import folder_strategy

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


def _kept(stop: GracefulStop, outputs: RunOutputs) -> str:
    """What a failed run left on disk and where to go on from."""
    image = f"the last good image is in {outputs.interrupted}" if outputs.interrupted in stop.saved else "no image was saved"
    step = checkpoint_step(stop.checkpoint_path)
    if step is None:
        return f"{image}; no checkpoint was written yet, so start again with overwrite=True"
    return f'{image}; {stop.checkpoint_path} holds step {step}: continue with resume="last"'


def _interrupted(stop: GracefulStop, outputs: RunOutputs) -> RunInterrupted:
    signum = stop.signum if stop.signum is not None else signal.SIGINT
    saved = " and ".join(str(p) for p in stop.saved) or "nothing"
    step = checkpoint_step(stop.checkpoint_path)
    if stop.at_once:
        held = f"; {stop.checkpoint_path} holds step {step}" if step is not None else ""
        summary = f"stopped at once by a second signal during step {(stop.step or 0) + 1}; saved {saved}{held}"
    else:
        summary = f"interrupted by {signal.Signals(signum).name} at step {stop.step}; saved {saved}"
    return RunInterrupted(summary, signum, resumable=step is not None)


def _as_nst_error(
    err: BaseException,
    config: RunConfig,
    shapes: tuple[Shape, list[Shape]],
    stop: GracefulStop,
    outputs: RunOutputs,
) -> NSTError | None:
    """The user-facing error for a run that failed inside the Trainer, saying what was kept; None if unforeseen."""
    if stop.stopped_by_signal and GracefulStop.is_stop(err):
        return _interrupted(stop, outputs)
    if isinstance(err, NumericalError):
        return NumericalError(f"{err}; {_kept(stop, outputs)}")
    if is_out_of_memory(err):
        return ResourceError(f"{out_of_memory_message(config, *shapes)}; {_kept(stop, outputs)}")
    if is_write_failure(err):
        return write_failure(err, _kept(stop, outputs), where=f"the run's files in {outputs.root}")
    return None


def fit(
    config: RunConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    extractor: VGGFeatures | None = None,
    target_cache: MutableMapping[str, Any] | None = None,
    verbose: bool = False,
) -> RunOutputs:
    """Run one style transfer as ``config`` describes; returns where its files are.

    ``resume``: ``"last"`` or a checkpoint path continues that optimisation (in its coarse-to-fine stage,
    then the later stages); ``overwrite`` replaces a previous run in the same output directory. Everything
    is checked before the first file is written. SIGINT or SIGTERM stop at the end of the step, saving
    ``last.ckpt`` and ``interrupted.png`` (RunInterrupted); a NaN, an infinity or running out of memory
    keep the last good image and checkpoint. ``extractor`` and ``target_cache`` let several runs (a sweep)
    share the loaded network and the computed targets.

    Lightning's start-up messages (accelerator lines, tips) and known deprecation notices are held back unless
    ``verbose``; logger levels and warning filters are as before once it returns.
    """
    with lightning_quiet(verbose):
        if is_batch(config):
            raise ConfigError(
                "the config names a folder, glob or list of images; run it with nst_lightning.fit_batch(config)"
            )
        if is_clip(config):
            raise ConfigError("the config names a clip (a video file or video.enabled); run it with nst_lightning.fit_clip(config)")
        if is_clip_batch(config):
            raise ConfigError("the config names a folder, glob or list of clips; run it with nst_lightning.fit_clips(config)")
        outputs = RunOutputs(Path(config.output))
        if outputs.root.is_file():
            raise ConfigError(f"output {outputs.root} is a file (an input image?); give a directory for the run's outputs")
        with FolderLock(outputs.root):
            _fit_locked(config, outputs, resume, overwrite, progress, callbacks, extractor, target_cache)
        return outputs


def _features_for(config: RunConfig, size: int, shapes: tuple[Shape, list[Shape]]) -> FeaturesConfig:
    """The features section of a stage at ``size``: checkpointed blocks and tiling as its memory plan resolves
    them (an earlier, smaller stage of a tiled run may fit whole); ResourceError when it cannot fit."""
    staged = config.model_copy(update={"image": config.image.model_copy(update={"size": size})})
    blocks, estimate = check_fits(staged, *shapes)
    return config.features.model_copy(update={"checkpoint_blocks": blocks, "tile": estimate.tile or "off"})


def _fit_locked(
    config: RunConfig,
    outputs: RunOutputs,
    resume: str | None,
    overwrite: bool,
    progress: bool,
    callbacks: list[Callback] | None,
    extractor: VGGFeatures | None,
    target_cache: MutableMapping[str, Any] | None,
) -> None:
    """``fit`` while holding the output folder's lock, so the checks below still hold when files are written."""
    check_output(config, outputs, resuming=resume is not None, overwrite=overwrite)
    stages = plan_stages(config, outputs)
    start, ckpt_path = resume_point(config, resume, stages)
    shapes = (read_size(config.content), [read_size(p) for p in config.styles])
    plans = {stage.size: _features_for(config, stage.size, shapes) for stage in stages[start:]}
    for line in input_warnings(config):  # once the run is known to go ahead
        log.warning("%s", line)
    masks = load_masks(config)
    L.seed_everything(config.seed, workers=False, verbose=False)
    init: str | torch.Tensor | None = None
    for stage in stages[start:]:
        content, styles = load_images(config, stage.size)
        stop = GracefulStop(stage.last_checkpoint, outputs.interrupted)
        trainer = build_trainer(
            config, outputs, progress, [stop, *(callbacks or [])], stage=stage, shown=(content, styles)
        )
        module = build_module(
            config, content, styles, masks=masks, init=init, extractor=extractor, target_cache=target_cache,
            features=plans[stage.size],
        )
        extractor = module.extractor
        first = stage.index == start
        if first and ckpt_path is not None:
            module.check_checkpoint(read_checkpoint(ckpt_path))
        if config.features.onnx:
            onnx_targets(config, module)
        if first:
            prepare_output(outputs, resuming=ckpt_path is not None, overwrite=overwrite)
            with reporting_write_failures():
                write_text_atomic(outputs.config, dump_config(config))
        with stop.handling_signals():
            try:
                trainer.fit(module, ckpt_path=ckpt_path if first else None)
            except BaseException as err:
                known = _as_nst_error(err, config, shapes, stop, outputs)
                if known is None:
                    raise
                raise known from None
        if trainer.should_stop or trainer.global_step < stage.steps:
            return  # asked to stop: later stages wait for a resume
        init = module.optimised_image()
    outputs.interrupted.unlink(missing_ok=True)  # finished: an image of an earlier stop would only mislead
