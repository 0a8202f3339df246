"""One short function per run kind, each over the session: an image (with its coarse-to-fine stages), a folder of
images, a clip and a folder of clips.

``api.run`` picks the function from the config's kind; the old names (``fit``, ``fit_batch``, ``fit_clip``,
``fit_clips``) are these functions.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from .atomic import check_writable, remove_stale_temps, reporting_write_failures, write_text_atomic
from .folder import BatchReport, ImagesProgressBar, check_folder_config, images_per_device, plan_folder_memory
from .config import RunConfig, dump_config
from .data import PairResult, StylePairsDataModule
from .errors import ConfigError, NSTError, RunInterrupted
from .export import onnx_targets
from .faults import GracefulStop
from .features import VGGFeatures
from .flow import require_opencv
from .groups import FolderGroups, GroupStop, check_folder_strategy, distributed_before, gather_results
from .images import read_size, resize, save_image
from .inputs import build_module, init_input, input_warnings, load_images, load_masks, load_styles, loading
from .pairs import Pair, expand_pairs, pending
from .resources import out_of_memory_message, plan_run
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
from .session import RERUN_CLIPS, RERUN_FOLDER, Failure, build_trainer, fit, interrupted, seed, session
from .video import (
    ClipOutputs,
    Flows,
    check_clip_config,
    check_clip_output,
    check_record,
    clip_config,
    clip_finished,
    clip_record,
    fps_text,
    frame_label,
    frame_order,
    frame_start,
    prepare_clip,
)
from .videoio import read_clip, write_video

log = logging.getLogger(__name__)


def run_image(
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
    kind = config.kind
    if kind != "image":
        name = {"folder": "fit_batch", "clip": "fit_clip", "clips": "fit_clips"}[kind]
        raise ConfigError(f"the config names {KIND_TEXT[kind]}; run it with nst_lightning.{name}(config) or nst_lightning.run(config)")
    outputs = RunOutputs(Path(config.output))
    with session(outputs.root, "image", "the run's outputs", verbose):
        check_output(config, outputs, resuming=resume is not None, overwrite=overwrite)
        stages = plan_stages(config, outputs)
        start, ckpt_path = resume_point(config, resume, stages)
        shapes = (read_size(config.content), [read_size(p) for p in config.styles])
        plans = {stage.size: plan_run(config, *shapes, size=stage.size) for stage in stages[start:]}
        for line in input_warnings(config):  # once the run is known to go ahead
            log.warning("%s", line)
        masks = load_masks(config)
        seed(config)
        init: Any = None
        coarse: Any = None  # the previous stage's content
        for stage in stages[start:]:
            content, styles = load_images(config, stage.size)
            if init is not None and config.scale_init == "detail":
                init = with_content_detail(init, content, coarse)
            coarse = content
            stop = GracefulStop(stage.last_checkpoint, outputs.interrupted)
            trainer = build_trainer(config, outputs, progress, [stop, *(callbacks or [])], stage=stage, shown=(content, styles))
            module = build_module(
                config, content, styles, masks=masks, init=init, extractor=extractor, target_cache=target_cache,
                features=plans[stage.size].features, optim=plans[stage.size].optim,
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
            fit(trainer, module, stop, _image_failure(config, shapes, stop, outputs), ckpt_path=ckpt_path if first else None)
            if trainer.should_stop or trainer.global_step < stage.steps:
                return outputs  # asked to stop: later stages wait for a resume
            init = module.optimised_image()
        outputs.interrupted.unlink(missing_ok=True)  # finished: an image of an earlier stop would only mislead
        return outputs


def with_content_detail(result: torch.Tensor, content: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """A later scale's start for ``scale_init=detail``: the previous ``result`` upsampled to ``content``'s size plus
    the content's detail that its previous-scale copy ``coarse`` could not hold, clamped to ``[0, 1]``.

    Plain upsampling leaves the new scale blurred, so its steps go to winning back edges the content already has.
    """
    shape = tuple(content.shape[-2:])
    return (resize(result, shape) + content - resize(coarse, shape)).clamp_(0.0, 1.0)


KIND_TEXT = {
    "folder": "a folder, glob or list of images",
    "clip": "a clip (a video file or video.enabled)",
    "clips": "a folder, glob or list of clips",
}


def _image_failure(config: RunConfig, shapes: tuple[Any, Any], stop: GracefulStop, outputs: RunOutputs) -> Failure:
    """What a single run (or a clip's frame, run in ``outputs``) says when its fit fails."""

    def kept() -> str:
        image = f"the last good image is in {outputs.interrupted}" if outputs.interrupted in stop.saved else "no image was saved"
        step = checkpoint_step(stop.checkpoint_path)
        if step is None:
            return f"{image}; no checkpoint was written yet, so start again with overwrite=True"
        return f'{image}; {stop.checkpoint_path} holds step {step}: continue with resume="last"'

    return Failure(
        kept=kept,
        out_of_memory=lambda: f"{out_of_memory_message(config, *shapes)}; {kept()}",
        files=f"the run's files in {outputs.root}",
        stopped=lambda: interrupted(stop, f"at step {stop.step}"),
    )


def run_folder(
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
    output = Path(config.output)
    with session(output, "folder", "the batch's images", verbose):
        check_folder_config(config)
        pairs = expand_pairs(config)
        todo, complete = pending(pairs, overwrite)
        skipped = [p.name for p in complete]
        if not todo:
            output.mkdir(parents=True, exist_ok=True)
            report = BatchReport(output, len(pairs), skipped, [], is_global_zero=rank_zero_only.rank == 0)
            report.save(config)
            return report
        per_device = images_per_device(config)
        plan = plan_folder_memory(config, todo, per_device)
        check_writable(output)  # after every refusal, before any work: a read-only or full disk is said at once
        groups = FolderGroups()
        stop = GroupStop(groups)
        bars = [ImagesProgressBar()] if progress else []
        trainer = build_trainer(config, output, progress=False, callbacks=[*bars, stop, *(callbacks or []), groups], folder=True)
        module = build_module(
            config, None, None, masks=load_masks(config), init=init_input(config),
            features=plan.features if plan else None, optim=plan.optim if plan else None,
        )
        data = StylePairsDataModule.from_config(config, todo, images_per_device=per_device)
        checkpoints = output / "checkpoints"
        output.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for old in checkpoints.glob("group-*.ckpt"):
                old.unlink()
        remove_stale_temps(checkpoints)
        seed(config)
        owned = not distributed_before()
        failure = Failure(
            kept=lambda: f"images already written are kept and a rerun skips them; the group's checkpoint is in {checkpoints}",
            out_of_memory=lambda: (
                f"out of memory with batch.images_per_device={per_device} at image.size={config.image.size}; "
                "lower batch.images_per_device or image.size"
            ),
            files=f"the folder's files in {output}",
            stopped=lambda: interrupted(stop, rerun=RERUN_FOLDER),
        )
        fit(trainer, module, stop, failure, datamodule=data)
        results = gather_results(groups.results, release=owned)
        report = BatchReport(output, len(pairs), skipped, results, trainer.world_size, trainer.is_global_zero)
        report.save(config)
        return report


def run_clip(
    config: RunConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    extractor: VGGFeatures | None = None,
    verbose: bool = False,
    label: str | None = None,
) -> ClipOutputs:
    """Stylise the clip ``config.content`` names; writes ``stylised.mp4`` and ``frames/000001.png``, ... under ``output``.

    ``resume="last"`` continues at the first unfinished frame (a resume with another clip or other settings is
    refused); ``overwrite`` replaces a previous run. Bad clips are refused before anything is written. SIGINT or
    SIGTERM stop after the current step of the current frame (RunInterrupted); finished frames are kept.

    Lightning's start-up messages (accelerator lines, tips) and known deprecation notices are held back unless
    ``verbose``; logger levels and warning filters are as before once it returns. ``label`` names the clip in
    the progress line (a folder run of clips passes the clip's output name).
    """
    outputs = ClipOutputs(Path(config.output))
    with session(outputs.root, "clip", "the clip's outputs", verbose):
        check_clip_config(config, resume)
        resuming = resume is not None
        check_clip_output(config, outputs, resuming, overwrite)
        video = config.video
        clip = read_clip(config.contents, config.image.size, config.image.fit, video.every_nth_frame, video.fps, loading(config))
        record = clip_record(config, clip)
        if resuming:
            check_record(outputs, record)
        styles = load_styles(config, clip.shape)
        shapes = (clip.shape, [tuple(s.shape[-2:]) for s in styles])
        plan = plan_run(config, *shapes)
        masks = load_masks(config)
        require_opencv()
        seed(config)
        # the first frame's cold-start scale serves every frame (also when resuming mid-clip); a features.onnx graph
        # is opened and validated on that frame, before anything is written, then computes every frame's targets
        first = build_module(config, clip.frame(0), styles, masks=masks, extractor=extractor, features=plan.features, optim=plan.optim)
        extractor = first.extractor
        graph = onnx_targets(config, first) if config.features.onnx else None
        scale = first.starting_objective_scale()
        prepare_clip(outputs, config, record, resuming, overwrite)
        log.info("clip %s: %d frames of %dx%d at %s fps", clip.source, len(clip), clip.shape[1], clip.shape[0], fps_text(clip))
        flows = Flows(clip, video.flow, keep=video.passes > 1)
        redo = False
        for p, i, neighbour in frame_order(len(clip), video.passes):
            target = outputs.frame(i, p, video.passes)
            if target.is_file() and not redo:
                continue
            redo = True  # every later frame depends on this one
            init, temporal = frame_start(config, outputs, flows, p, i, neighbour)
            module = build_module(
                config, clip.frame(i), styles, masks=masks, init=init, extractor=extractor, features=plan.features,
                optim=plan.optim, temporal=temporal,
            )
            if graph is not None:
                onnx_targets(config, module, graph)
            module.use_objective_scale(scale)
            where = frame_label(p, i, len(clip), video.passes, label)
            if not _run_frame(config, outputs, module, shapes, where, progress, callbacks):
                log.warning('stopped by a callback at frame %d; continue with resume="last"', i + 1)
                return outputs
            save_image(module.result(), target)
        write_video([outputs.frame(i, video.passes - 1, video.passes) for i in range(len(clip))], outputs.video, clip.fps)
        shutil.rmtree(outputs.work, ignore_errors=True)
        return outputs


def _run_frame(
    config: RunConfig,
    outputs: ClipOutputs,
    module: Any,
    shapes: tuple[Any, Any],
    label: str,
    progress: bool,
    callbacks: list[Callback] | None,
) -> bool:
    """Optimise one frame in the session's Trainer (its run folder ``work/``); False when a callback stopped it early."""
    steps = config.trainer.max_steps
    frame_config = config.model_copy(
        update={
            "checkpoint": config.checkpoint.model_copy(update={"every_n_steps": steps}),
            "snapshot": config.snapshot.model_copy(update={"every_n_steps": 0}),
        }
    )
    work = RunOutputs(outputs.work)
    stage = Stage(0, 1, config.image.size, steps, 0, work.checkpoints)
    stop = GracefulStop(work.last_checkpoint, work.interrupted)
    trainer = build_trainer(frame_config, work, progress, [stop, *(callbacks or [])], stage=stage, label=label)
    failure = _image_failure(config, shapes, stop, work)
    frames = outputs.frames if config.video.passes == 1 else outputs.root
    failure.stopped = lambda: interrupted(
        stop, f"at {label.lower()}", kept=f"the frames before it are in {frames}", resumable=True
    )
    fit(trainer, module, stop, failure)
    return not trainer.should_stop and trainer.global_step >= steps


def run_clips(
    config: RunConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    verbose: bool = False,
) -> BatchReport:
    """Stylise every clip x style pair the config names; finished clips are skipped unless ``overwrite``.

    A clip's frames depend on each other, so a clip is never split: rank r of N takes clips r, r+N, ... and
    stylises each on its own device with ``run_clip``. Lightning Fabric starts the ranks (``trainer.devices``,
    ``num_nodes``; torchrun and SLURM detected). A clip that cannot be read or stylised is reported failed (one
    line) and the others go on. Returns the report of all ranks; rank zero writes ``OUTPUT/batch-summary.json``
    and ``OUTPUT/config.yaml``. Lightning's start-up messages are held back unless ``verbose``.
    """
    output = Path(config.output)
    with session(output, "clips", "the clips' outputs", verbose):
        check_clip_config(config, None)
        pairs = expand_pairs(config, clips=True)
        skipped = [] if overwrite else [p.name for p in pairs if clip_finished(p)]
        todo = [p for p in pairs if p.name not in skipped]
        require_opencv()
        check_writable(output)
        t = config.trainer
        strategy = check_folder_strategy(config, "clip folders (each rank stylises whole clips)")
        fabric = Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy)
        results = fabric.launch(_run_shard, config, todo, overwrite, progress, callbacks, not distributed_before())
        report = BatchReport(output, len(pairs), skipped, results, fabric.world_size, fabric.is_global_zero, unit="clips")
        report.save(config)
        return report


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
            run_clip(
                clip_config(config, pair, devices), resume=resume, overwrite=overwrite, progress=progress and rank == 0,
                callbacks=callbacks, label=f"clip {number}/{len(mine)} {pair.name}",
            )
            status, error = ("done", None) if clip_finished(pair) else ("failed", "stopped by a callback before its last frame")
        except RunInterrupted as err:
            stopped = RunInterrupted(err.summary, err.signum, resumable=False)
            stopped.hint = RERUN_CLIPS
            raise stopped from None
        except NSTError as err:
            status, error = "failed", str(err)
        results.append(
            PairResult(pair.name, pair.content, list(pair.styles), pair.output, rank, status, error, None, time.perf_counter() - start)
        )
    return gather_results(results, release=release)
