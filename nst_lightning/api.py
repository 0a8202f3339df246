"""The Python API: ``fit(config)`` loads the images, builds the module and the Trainer, and runs.

The one place where config, images, features, module and Trainer are assembled; the CLI calls it.
"""

from __future__ import annotations

import errno
import logging
import shutil
import signal
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from .atomic import remove_stale_temps, write_text_atomic
from .callbacks import FinalImage, ImageSnapshots, LossHistory, RunPlots, StepCheckpoint, StepProgressBar
from .config import INIT_KEYWORDS, FeaturesConfig, RunConfig, all_layers, dump_config
from .errors import CheckpointError, ConfigError, NSTError, NumericalError, OnnxError, ResourceError, RunInterrupted
from .export import DEFAULT_RTOL, ExportInfo, ExtractorSpec, OnnxFeatures, ValidationReport, export_onnx, validate_onnx
from .faults import AtomicCheckpointIO, GracefulStop
from .features import VGGFeatures, min_side
from .hardware import resolve_precision
from .images import load_image, read_image, read_size, style_side, target_shape
from .losses import TemporalTarget
from .module import FINGERPRINT_KEY, StyleTransferModule, config_extractor
from .pairs import is_batch, is_clip
from .resources import Shape, check_fits, is_out_of_memory, out_of_memory_message

log = logging.getLogger(__name__)

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


def load_images(config: RunConfig, size: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The content image at ``size`` (default ``image.size``) and each style image scaled by its ``style_scale``."""
    content = load_image(config.content, size or config.image.size, config.image.fit)
    shape = tuple(content.shape[-2:])
    styles = [load_image(path, style_side(shape, scale), "long") for path, scale in zip(config.styles, config.style_scales())]
    return content, styles


def load_masks(config: RunConfig) -> list[torch.Tensor | None] | None:
    """Each style's mask image at full size (the module fits it to the output), or None."""
    if config.style_masks is None:
        return None
    return [None if path is None else read_image(path) for path in config.style_masks]


def init_input(config: RunConfig) -> str | torch.Tensor:
    """``config.init`` as the module takes it: a keyword (content, noise, style) or the loaded image."""
    return config.init if config.init in INIT_KEYWORDS else load_image(config.init)


def build_module(
    config: RunConfig,
    content: torch.Tensor,
    styles: list[torch.Tensor],
    *,
    masks: list[torch.Tensor | None] | None = None,
    init: str | torch.Tensor | None = None,
    extractor: VGGFeatures | None = None,
    target_cache: MutableMapping[str, Any] | None = None,
    features: FeaturesConfig | None = None,
    temporal: TemporalTarget | None = None,
) -> StyleTransferModule:
    """The LightningModule for ``config`` and already loaded images (``init`` and ``features`` override the config's).

    ``temporal`` adds the temporal term of a clip's frame (see ``nst_lightning.video``).
    """
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
    )


def build_trainer(
    config: RunConfig,
    outputs: RunOutputs,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    *,
    stage: Stage | None = None,
    shown: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
    label: str | None = None,
) -> L.Trainer:
    """A Trainer for ``stage`` (default: the whole single-scale run) writing checkpoints, snapshots, the loss
    history, the result so far as ``final.png`` and, given ``shown`` (the content and styles to show), the
    loss curve and side-by-side pictures under ``outputs``. ``label`` names the run on its progress bar.

    One image is one optimisation on one device: ``devices: auto`` means one here, and several devices or
    nodes are refused (DDP would average one image's gradients across ranks); batch runs use them.
    """
    t = config.trainer
    devices = 1 if t.devices == "auto" else t.devices
    if _device_count(devices) != 1 or t.num_nodes > 1:
        raise ConfigError(
            f"a single image is optimised on one device, but trainer.devices={t.devices}, "
            f"trainer.num_nodes={t.num_nodes}; set trainer.devices=1, or give a folder, glob or list of content "
            "images to spread a batch over devices and nodes"
        )
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
        own.append(RunPlots(outputs.losses, outputs.loss_curve, outputs.side_by_side, shown[0], shown[1], starts))
    if config.snapshot.every_n_steps:
        own.append(ImageSnapshots(outputs.snapshots, config.snapshot.every_n_steps, step_offset=stage.offset))
    if progress:
        if label is None:
            label = "Stylising" if stage.count == 1 else f"Stage {stage.index + 1}/{stage.count} ({stage.size} px)"
        own.append(StepProgressBar(label))
    try:
        return L.Trainer(
            accelerator=t.accelerator,
            devices=devices,
            num_nodes=t.num_nodes,
            strategy=t.strategy,
            precision=resolve_precision(t.precision, t.accelerator),
            max_steps=stage.steps,
            max_epochs=-1,
            log_every_n_steps=t.log_every_n_steps,
            logger=False,
            callbacks=own + list(callbacks or []),
            plugins=[AtomicCheckpointIO()],
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=outputs.root,
        )
    except Exception as err:  # Lightning validates accelerator, devices, strategy here, each with its own type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"Lightning rejects trainer settings (accelerator={t.accelerator}, devices={t.devices}, "
            f"strategy={t.strategy}): {first}; fix the trainer section"
        ) from None


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
    full = read_size(config.content)
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


def input_paths(config: RunConfig) -> list[Path]:
    """Every file the run reads: content, styles, style masks, an init image and a weights file."""
    paths = [config.content, *config.styles, *(p for p in config.style_masks or [] if p)]
    if config.init not in INIT_KEYWORDS:
        paths.append(config.init)
    if config.features.weights not in ("caffe", "torchvision"):
        paths.append(config.features.weights)
    return [Path(p).expanduser().resolve() for p in paths]


def check_output(config: RunConfig, outputs: RunOutputs, resuming: bool, overwrite: bool) -> None:
    """Refuse an output directory that would overwrite or delete an input, or clobber a previous run."""
    root = outputs.root.expanduser().resolve()
    if outputs.root.is_file():
        raise ConfigError(f"output {outputs.root} is a file (an input image?); give a directory for the run's outputs")
    written = {root / name for name in RUN_FILES}
    for path in input_paths(config):
        if path == root or path in written or any(path.is_relative_to(root / d) for d in RUN_DIRS):
            raise ConfigError(
                f"input {path} is where the run writes its outputs (final.png, snapshots/, ...) and would be "
                "overwritten; choose another --output or move the input"
            )
    previous = any((root / name).exists() for name in (*RUN_FILES, *RUN_DIRS))
    if previous and not resuming and not overwrite:
        raise ConfigError(
            f"output {outputs.root} holds a previous run; add --resume last to continue it, "
            "--overwrite to replace it, or choose another --output"
        )


def prepare_output(outputs: RunOutputs, resuming: bool, overwrite: bool) -> None:
    """Create the run directory; with ``overwrite`` (and not resuming) remove a previous run's files first.

    Temporary files that a killed run left half-written are removed; finished files are never touched.
    """
    root = outputs.root
    if overwrite and not resuming:
        for name in RUN_FILES:
            (root / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(root / name, ignore_errors=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create output directory {root} ({err.strerror}); choose another --output") from None
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


def _kept(stop: GracefulStop, outputs: RunOutputs) -> str:
    """What a failed run left on disk and where to go on from."""
    image = f"the last good image is in {outputs.interrupted}" if outputs.interrupted in stop.saved else "no image was saved"
    step = checkpoint_step(stop.checkpoint_path)
    if step is None:
        return f"{image}; no checkpoint was written yet, so start again with --overwrite"
    return f"{image}; {stop.checkpoint_path} holds step {step}: continue with --resume last"


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
    if isinstance(err, OSError) and (err.errno in (errno.ENOSPC, errno.EDQUOT) or err.filename is not None):
        where = err.filename or f"the run's files in {outputs.root}"  # a failed write() names no file
        return ResourceError(
            f"cannot write {where} ({err.strerror}); free disk space or fix permissions; {_kept(stop, outputs)}"
        )
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
) -> RunOutputs:
    """Run one style transfer as ``config`` describes; returns where its files are.

    ``resume``: ``"last"`` or a checkpoint path continues that optimisation (in its coarse-to-fine stage,
    then the later stages); ``overwrite`` replaces a previous run in the same output directory. Everything
    is checked before the first file is written. SIGINT or SIGTERM stop at the end of the step, saving
    ``last.ckpt`` and ``interrupted.png`` (RunInterrupted); a NaN, an infinity or running out of memory
    keep the last good image and checkpoint. ``extractor`` and ``target_cache`` let several runs (a sweep)
    share the loaded network and the computed targets.
    """
    if is_batch(config):
        raise ConfigError(
            "the config names a folder, glob or list of images; run it with nst_lightning.fit_batch(config)"
        )
    if is_clip(config):
        raise ConfigError("the config names a clip (a video file or video.enabled); run it with nst_lightning.fit_clip(config)")
    outputs = RunOutputs(Path(config.output))
    check_output(config, outputs, resuming=resume is not None, overwrite=overwrite)
    stages = plan_stages(config, outputs)
    start, ckpt_path = resume_point(config, resume, stages)
    shapes = (read_size(config.content), [read_size(p) for p in config.styles])
    blocks, _ = check_fits(config, *shapes)
    features = config.features.model_copy(update={"checkpoint_blocks": blocks})
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
            features=features,
        )
        extractor = module.extractor
        first = stage.index == start
        if first and ckpt_path is not None:
            module.check_checkpoint(read_checkpoint(ckpt_path))
        if config.features.onnx:
            onnx_targets(config, module)
        if first:
            prepare_output(outputs, resuming=ckpt_path is not None, overwrite=overwrite)
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
            break  # asked to stop: later stages wait for a resume
        init = module.optimised_image()
    return outputs


def build_config_extractor(config: RunConfig) -> VGGFeatures:
    """The frozen VGG19 extractor for every layer ``config``'s loss uses, with its weights and preprocessing."""
    return config_extractor(config.features, all_layers(config))


def default_export_path(config: RunConfig) -> Path:
    """``export/vgg19_<weights>_<pooling>_to_<deepest layer>.onnx`` under the working directory."""
    weights = config.features.weights
    source = weights if weights in ("caffe", "torchvision") else Path(weights).stem
    return Path("export") / f"vgg19_{source}_{config.features.pooling}_to_{all_layers(config)[-1]}.onnx"


def export_features(
    config: RunConfig, path: str | Path | None = None, *, overwrite: bool = False
) -> tuple[Path, ExportInfo]:
    """Export ``config``'s feature extractor as a checked ONNX graph plus sidecar; returns its path and metadata.

    An existing graph is replaced only with ``overwrite``, so a re-export never silently changes what a
    config's ``features.onnx`` points at.
    """
    target = Path(path) if path is not None else default_export_path(config)
    if target.is_dir() or target.suffix != ".onnx":
        raise ConfigError(f"export output {target} is not a .onnx file path; give e.g. --output export/vgg19.onnx")
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; add --overwrite to replace it or choose another --output")
    return target, export_onnx(build_config_extractor(config), target, config.features.weights)


def _label(name: str, image: torch.Tensor) -> str:
    return f"{name} {image.shape[-1]}x{image.shape[-2]}"


def _labelled(content: torch.Tensor, styles: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Images keyed as validation reports name them: ``content 320x240``, ``style 320x200`` (``style2 ...`` for several)."""
    out = {_label("content", content): content}
    for i, style in enumerate(styles, start=1):
        out[_label(f"style{i}" if len(styles) > 1 else "style", style)] = style
    return out


def validation_inputs(config: RunConfig, sizes: Sequence[int]) -> dict[str, torch.Tensor]:
    """The config's content and style images at each size (as ``image.size``), plus a seeded random image per size.

    The random images are odd-sized, so pooling that floors odd sides is exercised as well.
    """
    generator = torch.Generator().manual_seed(config.seed)
    side = min_side(all_layers(config))
    out: dict[str, torch.Tensor] = {}
    for size in sizes:
        sized = config.model_copy(update={"image": config.image.model_copy(update={"size": size})})
        out.update(_labelled(*load_images(sized)))
        noise = torch.rand(1, 3, max(side, size * 3 // 4 | 1), size, generator=generator)
        out[_label("random", noise)] = noise
    return out


def open_graph(config: RunConfig, path: str | Path, extractor: VGGFeatures) -> OnnxFeatures:
    """Load an exported graph with onnxruntime; refuse one exported for other layers, weights, pooling or preprocessing."""
    graph = OnnxFeatures(path)
    graph.check_matches(ExtractorSpec.of(extractor, config.features.weights))
    return graph


def validate_graph(
    config: RunConfig, path: str | Path, sizes: Sequence[int] | None = None, rtol: float | None = None
) -> ValidationReport:
    """Compare an exported graph with the torch extractor of ``config`` on its images and on random inputs.

    ``sizes`` defaults to ``image.size`` and half of it (never below what the layers need); ``rtol`` to
    ``DEFAULT_RTOL``.
    """
    extractor = build_config_extractor(config)
    graph = open_graph(config, path, extractor)
    side = min_side(extractor.layers)
    sizes = list(dict.fromkeys(sizes or [config.image.size, max(side, config.image.size // 2)]))
    small = [s for s in sizes if s < side]
    if small:
        raise ConfigError(
            f"size {small[0]} is below the {side} px the layers down to {all_layers(config)[-1]} need; "
            f"give --size {side} or more"
        )
    return validate_onnx(graph, extractor, validation_inputs(config, sizes), DEFAULT_RTOL if rtol is None else rtol)


def onnx_targets(config: RunConfig, module: StyleTransferModule) -> None:
    """Compute the module's fixed targets with the graph at ``features.onnx``, validating it first if asked.

    A graph that does not match the config, or (with ``features.validate_onnx``) disagrees with the torch
    extractor on this run's own images, is refused before anything is written.
    """
    graph = open_graph(config, config.features.onnx, module.extractor)
    report = None
    if config.features.validate_onnx:
        report = validate_onnx(graph, module.extractor, _labelled(module.content_image, module.style_images))
        if not report.ok:
            worst = ", ".join(f"{e.layer} {e.relative:.2e}" for e in report.failed)
            raise OnnxError(
                f"ONNX graph {graph.path} disagrees with the torch extractor on this run's images (relative error "
                f"{worst} > {report.rtol:g}); re-export it with `nst-lightning export --config CONFIG --overwrite`"
            )
    module.prepare_targets(graph)
    log.info("ONNX graph %s: onnxruntime providers %s", graph.path, ", ".join(graph.providers))
    for line in report.lines() if report else []:
        log.info("%s", line)
    log.info("content features and style Grams computed with onnxruntime")
