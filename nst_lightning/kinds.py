"""What a config's inputs name (one image, a folder or glob, video files) and so the kind of run it is.

The form of the input decides, not the number of matches. Imports nothing but the standard library, so the
config can derive its kind (``RunConfig.kind``) and the CLI answer at once.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

PAIR_SEPARATOR = "__"
"""Between the content and the style in a folder run's output names: ``<content>__<style>.png``, ``<clip>__<style>/``."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg")
RunKind = Literal["image", "folder", "clip", "clips"]
"""One image (with its stages), a folder of images, one clip, a folder of clips."""
HeldKind = Literal["image", "folder", "clip", "clips", "sweep"]
"""The kind of run whose files an output folder holds: a run kind, or a sweep (a grid of image runs)."""

CLIP_RECORD = "clip.json"
"""A clip run's record of its clip and settings, written before its first frame."""
FOLDER_SUMMARY = "batch-summary.json"
"""A folder run's (of images or of clips) record of every pair, written when it ends."""
SWEEP_SUMMARY = "sweep.csv"
SWEEP_CELLS = "cells"
"""A sweep's table and the folder of its cells' runs."""
IMAGE_RUN_MARKS = ("final.png", "interrupted.png", "losses.csv", "loss_curve.png", "side_by_side.png", "snapshots")
"""Files only a single-image run writes (``config.yaml`` and ``checkpoints/`` every kind may have)."""


def is_glob(entry: str) -> bool:
    """Whether an entry is a glob pattern."""
    return any(ch in entry for ch in "*?[")


def names_many(entry: str) -> bool:
    """Whether an input entry is a folder or a glob (so it may name several images)."""
    return is_glob(entry) or Path(os.path.expanduser(entry)).is_dir()


def is_video_file(entry: str) -> bool:
    """Whether an input entry names one video file, by its suffix (a glob such as ``clips/*.mp4`` does not)."""
    return not is_glob(entry) and Path(entry).suffix.lower() in VIDEO_SUFFIXES


def found(entry: str) -> list[Path]:
    """The visible files a folder (not recursive) or glob entry matches."""
    path = Path(os.path.expanduser(entry))
    if is_glob(entry):
        files = [Path(p) for p in glob.glob(os.path.expanduser(entry), recursive=True)]
    else:
        files = [p for p in path.iterdir() if not p.name.startswith(".")]
    return [p for p in files if p.is_file()]


def matches(entry: str, suffixes: tuple[str, ...]) -> bool:
    """Whether a folder or glob entry matches any file with one of ``suffixes``."""
    return any(p.suffix.lower() in suffixes for p in found(entry))


def run_kind(contents: Sequence[str], styles: Sequence[str], listed: bool, video: bool) -> RunKind:
    """The kind of run ``contents`` and ``styles`` make (``listed``: content was given as a list; ``video``:
    ``video.enabled``). A clip: video enabled, or one video file. A folder of clips: video files listed, or a
    folder or glob matching videos. A folder of images: a content list, or a folder or glob among the inputs."""
    if video or (len(contents) == 1 and is_video_file(contents[0])):
        return "clip"
    if any(is_video_file(e) or (names_many(e) and matches(e, VIDEO_SUFFIXES)) for e in contents):
        return "clips"
    if listed or any(names_many(e) for e in [*contents, *styles]):
        return "folder"
    return "image"


def held_kind(root: Path) -> HeldKind | None:
    """The kind of run whose files ``root`` holds, told by the files only that kind writes; None when no run's
    files are there (an empty or unrelated folder, or a run that wrote nothing but its ``config.yaml``)."""
    if not root.is_dir():
        return None
    if (root / SWEEP_SUMMARY).is_file() or (root / SWEEP_CELLS).is_dir():
        return "sweep"
    if (root / CLIP_RECORD).is_file():
        return "clip"
    unit = _summary_unit(root / FOLDER_SUMMARY)
    if unit is not None:
        return "clips" if unit == "clips" else "folder"
    children = [c for c in root.iterdir() if c.is_dir() and PAIR_SEPARATOR in c.name]
    if any((c / CLIP_RECORD).is_file() for c in children):
        return "clips"
    checkpoints = root / "checkpoints"
    if (root / FOLDER_SUMMARY).is_file() or any(checkpoints.glob("group-*.ckpt")):
        return "folder"
    if any((root / name).exists() for name in IMAGE_RUN_MARKS) or any(checkpoints.rglob("*.ckpt")):
        return "image"
    return None


def _summary_unit(path: Path) -> str | None:
    """What a folder run's summary counts (``images`` or ``clips``); None when there is none, it is unreadable, or
    it was written before summaries said (then the clips' own records tell)."""
    try:
        unit = json.loads(path.read_text(encoding="utf-8")).get("unit")
    except (OSError, ValueError, AttributeError):
        return None
    return unit if unit in ("images", "clips") else None
