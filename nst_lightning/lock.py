"""One run per output folder: an OS file lock held while a run writes there.

The lock is ``fcntl.flock`` on ``FOLDER/.nst-lightning.lock``. The kernel releases it when its process
ends, however it ends, so a crashed run's lock is stale and the next run takes it over; the file records
who holds it, so a refused run can name the other process.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from .atomic import is_write_failure, write_failure
from .errors import ConfigError

LOCK_NAME = ".nst-lightning.lock"


class FolderLock:
    """Hold the lock of ``folder`` (created if missing) from ``acquire`` to ``release``; a context manager."""

    def __init__(self, folder: str | os.PathLike[str], what: str = "run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> FolderLock:
        """Take the lock or raise ConfigError naming the process that holds it; never waits."""
        try:
            self._created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise ConfigError(
                        f"output {self.folder} is in use by another nst-lightning {self.what} ({holder(self.path)}); "
                        "wait for it to finish, stop it, or choose another output= directory"
                    ) from None
                if _same_file(fd, self.path):
                    self._fd = fd
                else:  # the holder removed the file between our open and lock: lock the new one
                    os.close(fd)
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}".encode())
        except OSError as err:
            self.release()
            if is_write_failure(err):
                raise write_failure(err, "the run's output folder must be writable") from None
            raise
        return self

    def release(self) -> None:
        """Remove the lock file and let go (removing first, so no one locks a file that is about to vanish).

        A folder the lock created is removed again if nothing else was written there (a refused run).
        """
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            if self._created:
                self.folder.rmdir()
        except OSError:  # not empty (the run wrote there), or already gone
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def holder(path: Path) -> str:
    """Who holds the lock at ``path``, as its file says (pid, host, start time, command).

    The holder writes its record right after taking the lock, so an empty file is read again for up to a second.
    """
    deadline = time.monotonic() + 1.0
    while True:
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        if text or time.monotonic() > deadline:
            return text or "a process that has not recorded itself yet"
        time.sleep(0.01)


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open ``fd`` is still the file at ``path`` (not one removed and recreated meanwhile)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
