"""A run's loss history, ``losses.csv``, read so that damage costs only the damaged lines.

A half-written, hand-edited or overwritten file keeps every valid row; what cannot be parsed is
reported and saved aside before the file is rewritten, never silently cut away. Plain Python.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write

LOSS_TERMS = ("content", "style", "smoothness", "loss")
"""The loss terms every run logs, in order: ``smoothness`` is the sum of the smoothness terms (total variation,
chroma, border)."""
LOSS_COLUMNS = ("step", *LOSS_TERMS)
OLD_COLUMNS = ("step", "content", "style", "tv", "loss")
"""The columns of histories written before the smoothness term had its name: read as ``LOSS_COLUMNS``, and
rewritten with them when a run resumes."""


@dataclass
class History:
    """The valid rows of a history file (``step`` as int, the rest as floats) and the lines that were not."""

    path: Path
    rows: list[dict[str, float]] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    """1-based line numbers of damaged lines (a bad header counts as line 1)."""

    def describe(self) -> str:
        """One line: what was kept and which lines were dropped."""
        lines = ", ".join(str(n) for n in self.dropped[:5]) + (", ..." if len(self.dropped) > 5 else "")
        return f"{self.path}: kept {len(self.rows)} valid rows, dropped {len(self.dropped)} damaged line(s) ({lines})"


def read_history(path: str | os.PathLike[str]) -> History:
    """The rows of ``path`` with a number in every column and increasing steps; a missing file is empty."""
    p = Path(path)
    history = History(p)
    if not p.is_file():
        return history
    with p.open(newline="", encoding="utf-8", errors="replace") as fh:
        lines = fh.read().replace("\0", "").splitlines()
    if not lines:
        return history
    try:
        header = next(csv.reader([lines[0]]))
    except csv.Error:
        header = []
    if tuple(h.strip() for h in header) not in (LOSS_COLUMNS, OLD_COLUMNS):
        history.dropped = list(range(1, len(lines) + 1))
        return history
    last = -1
    for number, line in enumerate(lines[1:], start=2):
        row = _parse(line)
        if row is None or row["step"] <= last:
            history.dropped.append(number)
            continue
        last = int(row["step"])
        history.rows.append(row)
    return history


def _parse(line: str) -> dict[str, float] | None:
    """One data line as a row, or None unless it has exactly the columns, a whole non-negative step and numbers."""
    try:
        values = next(csv.reader([line]))
        numbers = [float(v) for v in values]
    except (csv.Error, StopIteration, ValueError):
        return None
    if len(numbers) != len(LOSS_COLUMNS) or not numbers[0].is_integer() or numbers[0] < 0:
        return None
    if any(math.isinf(v) for v in numbers):
        return None
    row = dict(zip(LOSS_COLUMNS, numbers))
    row["step"] = int(row["step"])
    return row


def keep_damaged(history: History) -> Path:
    """Copy the damaged file beside itself (``losses.damaged.csv``, numbered if taken) before it is rewritten."""
    stem, suffix = history.path.stem, history.path.suffix
    target = history.path.with_name(f"{stem}.damaged{suffix}")
    n = 2
    while target.exists():
        target = history.path.with_name(f"{stem}.damaged-{n}{suffix}")
        n += 1
    data = history.path.read_bytes()
    return atomic_write(target, lambda fh: fh.write(data))
