"""Clips stylised with temporal coherence (Ruder, Dosovitskiy & Brox, "Artistic style transfer for videos", 2016).

The pieces of a clip run (``runs.run_clip``): its files, the frame order, the record a resume must match and
each frame's start. Frames go one after another through the same module and session as a single run. From the second frame on, a frame starts from the previous result warped to it by
optical flow (``video.init=warped``) and a temporal term pulls it towards that warp wherever the flow is
reliable (``video.temporal_weight``). Later passes alternate direction and blend each frame's previous pass
with its neighbour's warp, as the paper's multi-pass algorithm does. Finished frames are files, so a stopped
clip continues at its first unfinished frame.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import remove_stale_temps, write_text_atomic
from .config import RunConfig, dump_config
from .errors import CheckpointError, ConfigError
from .flow import flow_and_weights, warp
from .images import read_image
from .kinds import CLIP_RECORD
from .losses import TemporalTarget
from .pairs import Pair
from .rundir import check_inputs_outside
from .videoio import Clip

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
        return self.root / CLIP_RECORD

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


def clip_record(config: RunConfig, clip: Clip) -> dict[str, Any]:
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


def check_clip_output(config: RunConfig, outputs: ClipOutputs, resuming: bool, overwrite: bool) -> None:
    """Refuse an output directory that holds an input, or a previous run that would be clobbered."""
    inputs = [*config.contents, *config.styles, *(m for m in config.style_masks or [] if m)]
    check_inputs_outside(inputs, outputs.root, outputs.written(), "the clip writes its outputs (stylised.mp4, frames/, ...)")
    previous = any(p.exists() for p in outputs.written())
    if resuming and not outputs.record.is_file():
        raise CheckpointError(f"no clip to resume in {outputs.root} (no clip.json); run without resume= to start it")
    if previous and not resuming and not overwrite:
        raise ConfigError(
            f'output {outputs.root} holds a previous run; add resume="last" to continue it, '
            "overwrite=True to replace it, or choose another output= directory"
        )


def check_record(outputs: ClipOutputs, record: dict[str, Any]) -> None:
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


def prepare_clip(outputs: ClipOutputs, config: RunConfig, record: dict[str, Any], resuming: bool, overwrite: bool) -> None:
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


class Flows:
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


def fps_text(clip: Clip) -> str:
    return f"{float(clip.fps):g}"


def frame_label(p: int, i: int, count: int, passes: int, label: str | None = None) -> str:
    frame = f"Frame {i + 1}/{count}"
    where = frame if passes == 1 else f"Pass {p + 1}/{passes} {frame.lower()}"
    return where if label is None else f"{label}: {where[0].lower()}{where[1:]}"


def frame_start(
    config: RunConfig, outputs: ClipOutputs, flows: Flows, p: int, i: int, neighbour: int | None
) -> tuple[torch.Tensor | None, TemporalTarget | None]:
    """The init image of frame ``i`` in pass ``p`` (None: the config's ``init``) and its temporal target.

    The neighbour's result is read back from its file, so a resumed clip continues exactly as an
    uninterrupted one would.
    """
    video = config.video
    earlier = read_image(outputs.frame(i, p - 1, video.passes)) if p > 0 else None
    if neighbour is None or (video.temporal_weight == 0 and video.init == "content"):
        return earlier, None
    flow, weights = flows.flow(i, neighbour)
    warped = warp(read_image(outputs.frame(neighbour, p, video.passes)), flow)
    temporal = TemporalTarget(warped, weights, video.temporal_weight) if video.temporal_weight > 0 else None
    if video.init == "content":
        return earlier, temporal
    if earlier is None:
        return warped, temporal
    return earlier + PASS_BLEND * weights * (warped - earlier), temporal


def clip_finished(pair: Pair) -> bool:
    """A clip is finished when its video is written and its work folder removed (the last thing a clip run does)."""
    outputs = ClipOutputs(Path(pair.output))
    return outputs.video.is_file() and outputs.record.is_file() and not outputs.work.exists()


def clip_config(config: RunConfig, pair: Pair, rank_devices: Any) -> RunConfig:
    """The single-clip config of one pair of a clip folder, on this rank's one device."""
    trainer = config.trainer.model_copy(update={"devices": rank_devices, "num_nodes": 1, "strategy": "auto"})
    style: str | list[str] = pair.styles[0] if len(pair.styles) == 1 else list(pair.styles)
    return config.model_copy(update={"content": pair.content, "style": style, "output": pair.output, "trainer": trainer})
