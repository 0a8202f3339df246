"""Atomic file writes: a temporary file in the target's folder, then a rename.

A kill at any moment leaves either the old file or the new one, never half of one; a failed write
removes its temporary file. Plain Python, used for images, text files, ONNX graphs and checkpoints.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import ResourceError

TEMP_SUFFIX = ".tmp"

WRITE_FIXES = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free space within your disk quota",
    errno.EROFS: "the file system is read-only, so choose another location",
    errno.EACCES: "fix the folder's permissions or choose another location",
    errno.EPERM: "fix the folder's permissions or choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder, so choose another location",
    errno.EEXIST: "a part of the path is a file, not a folder, so choose another location",
}
"""The write failures a user can fix, and how (anything else is a bug and keeps its traceback)."""


def replace_atomically(path: str | os.PathLike[str], write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Let ``write`` create a temporary file beside ``path`` (by name), then rename it over ``path``.

    The temporary file is named ``.NAME.<pid>-<thread>.tmp`` and gets the umask's ordinary mode.
    ``fsync`` flushes it to disk before the rename (worth it for large, costly files such as
    checkpoints, so that even a power cut leaves the previous version intact).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}{TEMP_SUFFIX}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as err:
        _discard(tmp)
        if err.filename is None or Path(err.filename) == tmp:  # name the file being written, not its temporary
            raise OSError(err.errno, err.strerror, str(target)) from err
        raise
    except BaseException:
        _discard(tmp)
        raise
    return target


def _discard(tmp: Path) -> None:
    """Remove a temporary file after a failed write; a failure here (read-only disk) must not hide the first one."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` is a write failure the user can fix (disk full, read-only, no permission, a file in the path)."""
    return isinstance(err, OSError) and err.errno in WRITE_FIXES


def write_failure(err: OSError, what: str = "", where: str = "a file") -> ResourceError:
    """The one-line error for a failed write: the file (``where`` if the error names none), the system's reason
    and the fix (``what`` adds context)."""
    where = err.filename if err.filename is not None else where
    fix = WRITE_FIXES.get(err.errno or 0, "check the disk and the folder's permissions")
    return ResourceError(f"cannot write {where} ({err.strerror or err}); {fix}{'; ' + what if what else ''}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, fsync: bool = False) -> Path:
    """Call ``write`` on an open binary temporary file beside ``path``, then rename it over ``path``.

    A write that fails inside a library which reports it as something else (torch.save turns a full disk
    into a RuntimeError) raises the OSError the file gave.
    """

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            recorder = _WriteRecorder(fh)
            try:
                write(recorder)  # type: ignore[arg-type]
            except Exception:
                if recorder.error is not None:
                    raise recorder.error from None
                raise

    return replace_atomically(path, to_file, fsync=fsync)


class _WriteRecorder:
    """A binary file that remembers the OSError its ``write`` raised; everything else is the file's own."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self._fh, name)


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


@contextmanager
def reporting_write_failures(what: str = "") -> Iterator[None]:
    """Turn a write failure the user can fix inside the block into ``write_failure``'s ResourceError."""
    try:
        yield
    except OSError as err:
        if is_write_failure(err):
            raise write_failure(err, what) from None
        raise


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Create ``folder`` if needed and a file in it, so a read-only or full disk is reported before any work."""
    target = Path(folder)
    with reporting_write_failures("the output folder must be writable"):
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".write-check.{os.getpid()}-{threading.get_ident()}{TEMP_SUFFIX}"
        try:
            probe.write_bytes(b"\0")
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(target)) from None
        finally:
            _discard(probe)
