"""Weight sweeps: run every combination of a grid of config values and draw one labelled contact sheet.

The cells share one loaded VGG19 (per weights setting) and the computed content/style targets. Grid
parsing and cell configs need no torch, so a bad ``--grid`` is reported at once; torch, Lightning and
matplotlib are imported when the sweep runs.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .allocator import request_huge_pages
from .config import RunConfig, all_layers, build_config, set_value
from .errors import ConfigError, RunInterrupted
from .kinds import SWEEP_CELLS, SWEEP_SUMMARY

SHEET = "contact_sheet.png"
SUMMARY = SWEEP_SUMMARY
CELLS = SWEEP_CELLS


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets and quotes: ``1e2,[128,256]`` -> ``['1e2', '[128,256]']``."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``--grid key=v1,v2,...`` items as ``{key: [values]}``; values are YAML, as for ``--set``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = _split_top_level(text) if sep else []
        if not key or not values or any(not v for v in values):
            raise ConfigError(f"--grid {item!r} is not of the form key=v1,v2,... (e.g. --grid loss.style_weight=1e2,1e3)")
        if key in grid:
            raise ConfigError(f"--grid names {key} twice; give all its values in one --grid {key}=v1,v2,...")
        try:
            grid[key] = [yaml.safe_load(v) for v in values]
        except yaml.YAMLError:
            raise ConfigError(f"--grid {item!r}: a value is not valid YAML; quote it or fix the brackets") from None
    return grid


def label(value: Any) -> str:
    """A short text for a grid value: numbers and words as written, a path by its file name."""
    if isinstance(value, str):
        return Path(value).name if os.sep in value else value
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


@dataclass(frozen=True)
class Cell:
    """One combination of grid values and the validated config that runs it."""

    index: int
    values: dict[str, Any]
    config: RunConfig

    def title(self, keys: Sequence[str]) -> str:
        return "\n".join(f"{k} = {label(self.values[k])}" for k in keys)


def grid_cells(config: RunConfig, grid: Mapping[str, Sequence[Any]]) -> list[Cell]:
    """Every combination of ``grid`` applied to ``config`` (first key slowest), each validated, each with
    its own output ``OUTPUT/cells/NN``."""
    if not grid or any(len(v) == 0 for v in grid.values()):
        raise ConfigError("a sweep needs at least one --grid key=v1,v2,... with values")
    if "output" in grid:
        raise ConfigError("--grid cannot sweep output; each cell writes to OUTPUT/cells/NN, set --output instead")
    base = config.model_dump(mode="json", exclude_unset=True)
    root = Path(config.output)
    cells = []
    for index, combo in enumerate(itertools.product(*grid.values())):
        values = dict(zip(grid, combo))
        raw = json.loads(json.dumps(base))
        for key, value in values.items():
            set_value(raw, key.split("."), value, f"--grid {key}")
        raw["output"] = str(root / CELLS / f"{index:02d}")
        where = ", ".join(f"{k}={label(v)}" for k, v in values.items())
        cells.append(Cell(index, values, build_config(raw, f"sweep cell {where}")))
    return cells


@dataclass(frozen=True)
class SweepOutputs:
    """Where a sweep's files are: the contact sheet, the summary table, one run directory per cell."""

    root: Path
    cells: list[Path]

    @property
    def sheet(self) -> Path:
        return self.root / SHEET

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY


def sweep(
    config: RunConfig,
    grid: Mapping[str, Sequence[Any]],
    *,
    overwrite: bool = False,
    resume: bool | str = False,
    progress: bool = True,
    on_cell: Callable[[Cell, int], None] | None = None,
    cell_px: int = 160,
) -> SweepOutputs:
    """Run every cell of ``grid`` over ``config`` and write ``contact_sheet.png`` and ``sweep.csv`` in ``config.output``.

    Rows of the sheet are the combinations of all keys but the last, columns the last key's values.
    ``on_cell(cell, total)`` is called before each cell runs (the CLI prints progress with it). ``resume``
    continues a stopped sweep (``True`` or ``"last"``, as other runs say it): finished cells are kept, a stopped
    cell resumes from its last checkpoint; ``overwrite`` replaces a previous sweep. The folder is locked while the
    sweep runs.
    """
    if resume not in (True, False, "last"):
        raise ConfigError(f'resume={resume!r} is not for sweeps; give resume=True (or "last") to continue one')
    resume = bool(resume)
    from .lock import FolderLock

    request_huge_pages(config.image.size)  # before torch allocates (it reads the switch once)
    cells = grid_cells(config, grid)
    root = Path(config.output)
    if resume and overwrite:
        raise ConfigError("resume=True continues the sweep and overwrite=True replaces it; give one of them, not both")
    if root.is_file():
        raise ConfigError(f"output {root} is a file; give a directory for the sweep")
    from .faults import StopSignal, stopping_on_signals  # torch: after the huge-pages switch
    from .rundir import check_run_kind

    check_run_kind(root, "sweep")
    with FolderLock(root, "sweep"):
        try:
            with stopping_on_signals():
                results = _run_cells(config, grid, cells, overwrite, resume, progress, on_cell)
                return _summarise(config, grid, cells, cell_px, results)
        except StopSignal as err:
            name = signal.Signals(err.signum).name
            raise RunInterrupted(f"interrupted by {name} between cells; finished cells are kept", err.signum, False) from None


def _run_cells(
    config: RunConfig,
    grid: Mapping[str, Sequence[Any]],
    cells: list[Cell],
    overwrite: bool,
    resume: bool,
    progress: bool,
    on_cell: Callable[[Cell, int], None] | None,
) -> dict[int, Any]:
    """Run each cell not yet finished, sharing one extractor per features setting and the computed targets;
    returns what each cell run now ended with (``RunResult`` by cell index), kept in memory for the summary."""
    from .atomic import reporting_write_failures
    from .callbacks import RunResult
    from .features import extractor_for
    from .runs import run_image

    root = Path(config.output)
    if (root / SUMMARY).exists() or (root / CELLS).exists():
        if not (overwrite or resume):
            raise ConfigError(
                f"output {root} holds a previous sweep; add resume=True to finish its unfinished cells, overwrite=True "
                "to replace it, or choose another output= directory"
            )
        if overwrite:
            with reporting_write_failures("the sweep's folder must be writable"):
                (root / SHEET).unlink(missing_ok=True)
                (root / SUMMARY).unlink(missing_ok=True)
                if (root / CELLS).exists():
                    shutil.rmtree(root / CELLS)
        else:
            check_same_cells(cells)
    extractors: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    results: dict[int, Any] = {}
    for cell in cells:
        if on_cell is not None:
            on_cell(cell, len(cells))
        state = cell_state(cell)
        if state == "finished":
            continue
        feats = cell.config.features
        key = feats.model_dump_json()
        if key not in extractors:
            layers = sorted({n for c in cells if c.config.features == feats for n in all_layers(c.config)})
            extractors[key] = extractor_for(feats, layers)
        result = RunResult()
        run_image(
            cell.config,
            resume="last" if state == "resumable" else None,
            overwrite=state != "resumable",
            progress=progress,
            callbacks=[result],
            extractor=extractors[key],
            target_cache=targets,
        )
        if result.image is not None:
            results[cell.index] = result
    return results


def cell_state(cell: Cell) -> str:
    """``finished`` (final image at the last stage's last step), ``resumable`` (a checkpoint to go on from), or
    ``new`` (nothing worth keeping: not started, or stopped before its first checkpoint)."""
    from .rundir import RunOutputs, checkpoint_step, has_checkpoint, plan_stages

    outputs = RunOutputs(Path(cell.config.output))
    last = plan_stages(cell.config, outputs)[-1]
    if outputs.final.is_file() and checkpoint_step(last.last_checkpoint) == last.steps:
        return "finished"
    return "resumable" if has_checkpoint(outputs) else "new"


def check_same_cells(cells: list[Cell]) -> None:
    """Refuse to resume a sweep whose cells were written with other settings (another grid or --set)."""
    from .config import dump_config

    for cell in cells:
        written = Path(cell.config.output) / "config.yaml"
        if written.is_file() and written.read_text(encoding="utf-8", errors="replace") != dump_config(cell.config):
            raise ConfigError(
                f"sweep cell {written.parent} was run with other settings (its config.yaml differs); resume with the "
                "same --config, --set and --grid, or use overwrite=True to start the sweep again"
            )


def _summarise(
    config: RunConfig, grid: Mapping[str, Sequence[Any]], cells: list[Cell], cell_px: int, ran: Mapping[int, Any]
) -> SweepOutputs:
    """Draw the contact sheet and write ``sweep.csv`` from the finished cells: those run now from memory
    (``ran``), those a resumed sweep had finished before from their ``final.png`` and ``losses.csv``."""
    from .inputs import load_images
    from .atomic import reporting_write_failures, write_text_atomic
    from .images import read_image
    from .plots import contact_sheet, read_losses

    root = Path(config.output)
    keys = list(grid)
    columns = len(grid[keys[-1]])
    results = [ran[c.index].image if c.index in ran else read_image(Path(c.config.output) / "final.png") for c in cells]
    rows = [results[i : i + columns] for i in range(0, len(results), columns)]
    row_labels = [cells[i].title(keys[:-1]) for i in range(0, len(cells), columns)]
    col_labels = [f"{keys[-1]} = {label(v)}" for v in grid[keys[-1]]]
    content, styles = load_images(config)
    with reporting_write_failures():
        contact_sheet(content, styles, rows, row_labels, col_labels, root / SHEET, cell_px=cell_px)

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["cell", *keys, "content", "style", "smoothness", "loss", "final"])
    for cell in cells:
        out = Path(cell.config.output)
        last = ran[cell.index].terms if cell.index in ran else {k: v[-1] for k, v in read_losses(out / "losses.csv").items() if v}
        writer.writerow(
            [cell.index, *(label(cell.values[k]) for k in keys)]
            + [f"{last.get(k, float('nan')):.6g}" for k in ("content", "style", "smoothness", "loss")]
            + [str(out / "final.png")]
        )
    with reporting_write_failures():
        write_text_atomic(root / SUMMARY, buf.getvalue())
    return SweepOutputs(root, [Path(c.config.output) for c in cells])
