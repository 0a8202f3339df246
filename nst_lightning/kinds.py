"""What a config's inputs name (one image, a folder or glob, video files) and so the kind of run it is.

The form of the input decides, not the number of matches. Imports nothing but the standard library, so the
config can derive its kind (``RunConfig.kind``) and the CLI answer at once.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg")
RunKind = Literal["image", "folder", "clip", "clips"]
"""One image (with its stages), a folder of images, one clip, a folder of clips."""


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
