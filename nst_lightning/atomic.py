"""Atomic file writes: a temporary file in the target's folder, then a rename.

A kill at any moment leaves either the old file or the new one, never half of one; a failed write
removes its temporary file. Plain Python, used for images, text files and checkpoints alike.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, fsync: bool = False) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    ``fsync`` also flushes the data to disk before the rename (worth it for large, costly files such as
    checkpoints, so that even a power cut leaves the previous version intact).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=TEMP_SUFFIX, dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def remove_stale_temps(folder: str | os.PathLike[str], names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder`` (only those of ``names``, or all of them).

    Only files this module names (``.NAME.xxxx.tmp``) are touched; returns what was removed.
    """
    removed = []
    for path in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        target = path.name[1:].rsplit(".", 2)[0]
        if path.is_file() and (names is None or target in names):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
