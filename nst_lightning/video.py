"""Clips stylised with temporal coherence (Ruder, Dosovitskiy & Brox, "Artistic style transfer for videos", 2016).

Frames go one after another through the same module and Trainer as a single run (``api.build_module`` and
``api.build_trainer``). From the second frame on, a frame starts from the previous result warped to it by
optical flow (``video.init=warped``) and a temporal term pulls it towards that warp wherever the flow is
reliable (``video.temporal_weight``). Later passes alternate direction and blend each frame's previous pass
with its neighbour's warp, as the paper's multi-pass algorithm does. Finished frames are files, so a stopped
clip continues at its first unfinished frame.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from .api import _as_nst_error, build_module, build_trainer, load_masks
from .quiet import lightning_quiet
from .atomic import remove_stale_temps, write_text_atomic
from .config import RunConfig, dump_config
from .errors import CheckpointError, ConfigError, RunInterrupted
from .faults import GracefulStop
from .features import VGGFeatures
from .flow import flow_and_weights, require_opencv, warp
from .images import load_image, read_image, save_image, style_side
from .losses import TemporalTarget
from .resources import check_fits, refuse_tiling
from .rundir import RunOutputs, Stage
from .videoio import Clip, read_clip, write_video

log = logging.getLogger(__name__)

PASS_BLEND = 0.5
"""Weight of the neighbour's warp against the frame's previous pass where the flow is reliable (Ruder's delta)."""
RECORD_IGNORED = {"output", "checkpoint", "snapshot", "batch"}
"""Config sections that do not change the frames, so a clip may be resumed with them changed."""
TRAINER_IGNORED = {"accelerator", "devices", "num_nodes", "strategy", "log_every_n_steps"}


@dataclass(frozen=True)
class ClipOutputs:
    """Where a clip run's files are: ``stylised.mp4``, ``frames/000001.png``, ..., the config and the clip record."""

    root: Path

    @property
    def video(self) -> Path:
        return self.root / "stylised.mp4"

    @property
    def frames(self) -> Path:
        return self.root / "frames"

    @property
    def passes(self) -> Path:
        """Results of the passes before the last (multi-pass runs only; kept, so a resume does not redo them)."""
        return self.root / "passes"

    @property
    def work(self) -> Path:
        """The run directory of the frame being stylised (its checkpoint and losses); removed when the clip is done."""
        return self.root / "work"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def record(self) -> Path:
        """What the frames were made from (settings and clip), so a resume with other ones is refused."""
        return self.root / "clip.json"

    def frame(self, index: int, pass_index: int = 0, passes: int = 1) -> Path:
        """The result of frame ``index`` (0-based) in pass ``pass_index``: ``frames/000001.png`` for the last pass."""
        folder = self.frames if pass_index == passes - 1 else self.passes / f"pass{pass_index + 1}"
        return folder / f"{index + 1:06d}.png"

    def written(self) -> list[Path]:
        return [self.video, self.frames, self.passes, self.work, self.config, self.record]


def frame_order(count: int, passes: int) -> Iterator[tuple[int, int, int | None]]:
    """``(pass, frame, neighbour)`` in processing order: forward first, then alternating direction.

    The neighbour is the frame processed just before in the same pass (None for a pass's first frame).
    """
    for p in range(passes):
        order = range(count) if p % 2 == 0 else range(count - 1, -1, -1)
        previous = None
        for i in order:
            yield p, i, previous
            previous = i


def _record(config: RunConfig, clip: Clip) -> dict[str, Any]:
    settings = {k: v for k, v in config.model_dump(mode="json").items() if k not in RECORD_IGNORED}
    settings["trainer"] = {k: v for k, v in settings["trainer"].items() if k not in TRAINER_IGNORED}
    return {"settings": settings, "frames": len(clip), "size": list(clip.shape), "fps": str(clip.fps)}


def check_clip_config(config: RunConfig, resume: str | None) -> None:
    """Refuse settings a clip cannot honour, naming the key, before anything is read or written."""
    if resume not in (None, "last"):
        raise ConfigError(f'resume="{resume}" is not for clips; use resume="last" (it continues at the first unfinished frame)')
    if config.scales is not None:
        raise ConfigError("scales (coarse-to-fine) are not supported for clips; drop scales and set image.size")
    if config.color == "luminance":
        raise ConfigError("color=luminance is not supported for clips; use color=none or color=histogram")


def _check_output(config: RunConfig, outputs: ClipOutputs, resuming: bool, overwrite: bool) -> None:
    """Refuse an output directory that holds an input, or a previous run that would be clobbered."""
    root = outputs.root.expanduser().resolve()
    if outputs.root.is_file():
        raise ConfigError(f"output {outputs.root} is a file; give a directory for the clip's outputs")
    inputs = [*config.contents, *config.styles, *(m for m in config.style_masks or [] if m)]
    for entry in inputs:
        path = Path(entry).expanduser().resolve()
        if path == root or any(path == w.resolve() or path.is_relative_to(w.resolve()) for w in outputs.written()):
            raise ConfigError(f"input {entry} is where the clip writes its outputs; choose another output= directory")
    previous = any(p.exists() for p in outputs.written())
    if resuming and not outputs.record.is_file():
        raise CheckpointError(f"no clip to resume in {outputs.root} (no clip.json); run without resume= to start it")
    if previous and not resuming and not overwrite:
        raise ConfigError(
            f'output {outputs.root} holds a previous run; add resume="last" to continue it, '
            "overwrite=True to replace it, or choose another output= directory"
        )


def _check_record(outputs: ClipOutputs, record: dict[str, Any]) -> None:
    try:
        theirs = json.loads(outputs.record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(f"{outputs.record} is unreadable; start again with overwrite=True") from None
    if theirs == record:
        return
    keys = [k for k in ("frames", "size", "fps") if theirs.get(k) != record[k]]
    ours, old = record["settings"], theirs.get("settings", {})
    keys += [k for k in ours if old.get(k) != ours[k]]
    raise CheckpointError(
        f"{outputs.root} holds frames of another clip or settings ({', '.join(keys) or 'clip.json'} differ); "
        "resume with the same clip and settings, or use overwrite=True or another output= directory"
    )


def _prepare(outputs: ClipOutputs, config: RunConfig, record: dict[str, Any], resuming: bool, overwrite: bool) -> None:
    if overwrite and not resuming:
        for path in outputs.written():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    for folder in (outputs.root, outputs.frames):
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
    write_text_atomic(outputs.config, dump_config(config))
    write_text_atomic(outputs.record, json.dumps(record, indent=1, sort_keys=True))


class _Frames:
    """Flows between content frames (kept for later passes) and the results read back from their files."""

    def __init__(self, clip: Clip, method: str, keep: bool) -> None:
        self.clip, self.method, self.keep = clip, method, keep
        self.flows: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def flow(self, frame: int, neighbour: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow from ``frame`` to ``neighbour`` and its reliability weights."""
        key = (frame, neighbour)
        if key in self.flows:
            return self.flows[key]
        out = flow_and_weights(self.clip.frame(frame), self.clip.frame(neighbour), self.method)
        self.flows = {key: out, **(self.flows if self.keep else {})}
        return out


def fit_clip(
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
    with lightning_quiet(verbose):
        check_clip_config(config, resume)
        outputs = ClipOutputs(Path(config.output))
        resuming = resume is not None
        _check_output(config, outputs, resuming, overwrite)
        video = config.video
        clip = read_clip(config.contents, config.image.size, config.image.fit, video.every_nth_frame, video.fps)
        record = _record(config, clip)
        if resuming:
            _check_record(outputs, record)
        styles = [load_image(p, style_side(clip.shape, s), "long") for p, s in zip(config.styles, config.style_scales())]
        shapes = (clip.shape, [tuple(s.shape[-2:]) for s in styles])
        refuse_tiling(config, "clips")
        blocks, _ = check_fits(config, *shapes)
        features = config.features.model_copy(update={"checkpoint_blocks": blocks})
        masks = load_masks(config)
        require_opencv()
        _prepare(outputs, config, record, resuming, overwrite)
        log.info("clip %s: %d frames of %dx%d at %s fps", clip.source, len(clip), clip.shape[1], clip.shape[0], _fps(clip))
        L.seed_everything(config.seed, workers=False, verbose=False)
        frames = _Frames(clip, video.flow, keep=video.passes > 1)
        redo = False
        scale: torch.Tensor | None = None
        for p, i, neighbour in frame_order(len(clip), video.passes):
            target = outputs.frame(i, p, video.passes)
            if target.is_file() and not redo:
                continue
            redo = True  # every later frame depends on this one
            init, temporal = _start(config, outputs, frames, p, i, neighbour)
            module = build_module(
                config, clip.frame(i), styles, masks=masks, init=init, extractor=extractor, features=features, temporal=temporal
            )
            extractor = module.extractor
            if scale is None:  # the first frame's cold-start scale, for every frame (also when resuming mid-clip)
                first = build_module(config, clip.frame(0), styles, masks=masks, extractor=extractor, features=features)
                scale = first.starting_objective_scale()
            module.use_objective_scale(scale)
            if not _run_frame(config, outputs, module, shapes, _where(p, i, len(clip), video.passes, label), progress, callbacks):
                log.warning('stopped by a callback at frame %d; continue with resume="last"', i + 1)
                return outputs
            save_image(module.result(), target)
        write_video([outputs.frame(i, video.passes - 1, video.passes) for i in range(len(clip))], outputs.video, clip.fps)
        shutil.rmtree(outputs.work, ignore_errors=True)
        return outputs


def _fps(clip: Clip) -> str:
    return f"{float(clip.fps):g}"


def _where(p: int, i: int, count: int, passes: int, label: str | None = None) -> str:
    frame = f"Frame {i + 1}/{count}"
    where = frame if passes == 1 else f"Pass {p + 1}/{passes} {frame.lower()}"
    return where if label is None else f"{label}: {where[0].lower()}{where[1:]}"


def _start(
    config: RunConfig, outputs: ClipOutputs, frames: _Frames, p: int, i: int, neighbour: int | None
) -> tuple[torch.Tensor | None, TemporalTarget | None]:
    """The init image of frame ``i`` in pass ``p`` (None: the config's ``init``) and its temporal target.

    The neighbour's result is read back from its file, so a resumed clip continues exactly as an
    uninterrupted one would.
    """
    video = config.video
    earlier = read_image(outputs.frame(i, p - 1, video.passes)) if p > 0 else None
    if neighbour is None or (video.temporal_weight == 0 and video.init == "content"):
        return earlier, None
    flow, weights = frames.flow(i, neighbour)
    warped = warp(read_image(outputs.frame(neighbour, p, video.passes)), flow)
    temporal = TemporalTarget(warped, weights, video.temporal_weight) if video.temporal_weight > 0 else None
    if video.init == "content":
        return earlier, temporal
    if earlier is None:
        return warped, temporal
    return earlier + PASS_BLEND * weights * (warped - earlier), temporal


def _run_frame(
    config: RunConfig,
    outputs: ClipOutputs,
    module: Any,
    shapes: tuple[Any, Any],
    label: str,
    progress: bool,
    callbacks: list[Callback] | None,
) -> bool:
    """Optimise one frame with the package's Trainer; False when a callback stopped it early."""
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
    with stop.handling_signals():
        try:
            trainer.fit(module)
        except BaseException as err:
            if stop.stopped_by_signal and GracefulStop.is_stop(err):
                signum = stop.signum if stop.signum is not None else signal.SIGINT
                raise RunInterrupted(
                    f"interrupted by {signal.Signals(signum).name} at {label.lower()}; the frames before it are in "
                    f"{outputs.frames if config.video.passes == 1 else outputs.root}",
                    signum,
                    resumable=True,
                ) from None
            known = _as_nst_error(err, config, shapes, stop, work)
            if known is None:
                raise
            raise known from None
    return not trainer.should_stop and trainer.global_step >= steps
