"""Atomic file writes: a temporary file in the target's folder, then a rename.

A kill at any moment leaves either the old file or the new one, never half of one; a failed write
removes its temporary file. Plain Python, used for images, text files, ONNX graphs and checkpoints.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def replace_atomically(path: str | os.PathLike[str], write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Let ``write`` create a temporary file beside ``path`` (by name), then rename it over ``path``.

    The temporary file is named ``.NAME.<pid>-<thread>.tmp`` and gets the umask's ordinary mode.
    ``fsync`` flushes it to disk before the rename (worth it for large, costly files such as
    checkpoints, so that even a power cut leaves the previous version intact).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}{TEMP_SUFFIX}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, fsync: bool = False) -> Path:
    """Call ``write`` on an open binary temporary file beside ``path``, then rename it over ``path``."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            write(fh)

    return replace_atomically(path, to_file, fsync=fsync)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def remove_stale_temps(folder: str | os.PathLike[str], names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder`` (only those of ``names``, or all of them).

    Only files this module names (``.NAME.<token>.tmp``) are touched; returns what was removed.
    """
    removed = []
    for path in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        target = path.name[1:].rsplit(".", 2)[0]
        if path.is_file() and (names is None or target in names):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
