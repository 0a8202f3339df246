"""The ``nst-lightning`` command: a thin typer layer over ``nst_lightning.api``.

The only place where errors become messages and exit codes. torch and lightning are imported inside
the commands that need them, so ``--help`` and config errors answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import NSTError

EXIT_USAGE = 2

app = typer.Typer(
    name="nst-lightning",
    help="Neural style transfer (Gatys et al. 2015) on PyTorch Lightning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML config file (see configs/).", show_default=False)
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key, e.g. --set image.size=256 (repeatable).", show_default=False),
]


def fail(message: str) -> typer.Exit:
    """Print a one-line error to stderr and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def _load(config: Optional[Path], overrides: Optional[list[str]], output: Optional[Path] = None):
    from .config import load_config

    extra = list(overrides or [])
    if output is not None:
        extra.append(f"output={output}")
    return load_config(config, extra)


def _quiet_lightning() -> None:
    """Hide Lightning's start-up chatter (accelerator lines, tips) and a known deprecation notice.

    Imports lightning first: its import sets its own logger to INFO.
    """
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (its import sets the logger level this overrides)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nst-lightning {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Neural style transfer (Gatys et al. 2015) on PyTorch Lightning."""


@app.command()
def fit(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        Optional[str], typer.Option("--resume", help="'last' or a checkpoint path: continue that run.", show_default=False)
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Run directory (overrides `output`).", show_default=False)
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in the output directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Stylise the content image; writes OUTPUT/final.png, snapshots, checkpoints, config and losses."""
    try:
        cfg = _load(config, set_, output)
        from .api import fit as run_fit

        _quiet_lightning()

        outputs = run_fit(cfg, resume=resume, overwrite=overwrite, progress=not quiet)
    except NSTError as err:
        raise fail(str(err)) from None
    typer.echo(f"wrote {outputs.final}")


@app.command()
def sweep(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    grid: Annotated[
        Optional[list[str]],
        typer.Option(
            "--grid",
            "-g",
            help="A key and the values to try, e.g. --grid loss.style_weight=1e2,1e3,1e4 (repeatable; every "
            "combination runs).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Sweep directory (overrides `output`).", show_default=False)
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous sweep in the output directory.")] = False,
    cell_px: Annotated[int, typer.Option("--cell-px", help="Width of each cell in the contact sheet, 32-1024 px.")] = 160,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run every combination of --grid values; writes OUTPUT/contact_sheet.png, sweep.csv and cells/NN/."""
    try:
        if not 32 <= cell_px <= 1024:
            raise NSTError(f"--cell-px {cell_px} is out of range; give 32 to 1024 pixels")
        cfg = _load(config, set_, output)
        from .sweep import grid_cells, parse_grid

        values = parse_grid(grid or [])
        cells = grid_cells(cfg, values)
        from .sweep import sweep as run_sweep

        _quiet_lightning()

        def announce(cell, total: int) -> None:
            where = ", ".join(f"{k}={v}" for k, v in cell.values.items())
            typer.echo(f"cell {cell.index + 1}/{total}: {where}")

        outputs = run_sweep(cfg, values, overwrite=overwrite, progress=not quiet, on_cell=announce, cell_px=cell_px)
    except NSTError as err:
        raise fail(str(err)) from None
    typer.echo(f"wrote {outputs.sheet} ({len(cells)} cells)")


@app.command("print-config")
def print_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults, file and --set overrides) as YAML."""
    from .config import dump_config

    try:
        cfg = _load(config, set_)
    except NSTError as err:
        raise fail(str(err)) from None
    typer.echo(dump_config(cfg), nl=False)


def run() -> None:
    """Console-script entry point."""
    sys.exit(app())
