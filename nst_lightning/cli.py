"""The ``nst-lightning`` command: a thin typer layer over ``nst_lightning.api``.

The only place where errors become messages and exit codes. torch and lightning are imported inside
the commands that need them, so ``--help`` and config errors answer at once.
"""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import __version__, api
from .api import NSTError, RunInterrupted, for_cli

EXIT_USAGE = 2
EXIT_MISMATCH = 1
"""validate-onnx ran but the graph is past the tolerance (bad input exits with EXIT_USAGE)."""
EXIT_SOME_FAILED = 1
"""A batch run finished but some of its images failed (listed in the summary)."""
EXIT_SIGNAL = 128
"""Runs stopped by a signal exit with 128 + its number, as shells report it (130 for Ctrl-C)."""

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


def echo_error(message: str, prefix: str = "error: ") -> None:
    """Print a message to stderr on one line (newlines escaped)."""
    one_line = message.replace("\r", "\\r").replace("\n", "\\n")
    typer.echo(f"{prefix}{one_line}", err=True)


def fail(message: str, code: int = EXIT_USAGE, prefix: str = "error: ") -> typer.Exit:
    """Print a one-line message to stderr, Python argument names said as this command's flags, and return the exit to raise."""
    echo_error(for_cli(message), prefix)
    return typer.Exit(code)


def _resume_command(config: Optional[Path], overrides: Optional[list[str]], output: Optional[Path]) -> str:
    """The command that continues this run: the same config, overrides and output, plus --resume last."""
    args = ["nst-lightning", "fit"]
    if config is not None:
        args += ["--config", str(config)]
    for item in overrides or []:
        args += ["--set", item]
    if output is not None:
        args += ["--output", str(output)]
    return shlex.join([*args, "--resume", "last"])


def _sweep_resume_command(
    config: Optional[Path], overrides: Optional[list[str]], grid: Optional[list[str]], output: Optional[Path], cell_px: int
) -> str:
    """The command that continues a stopped sweep: the same config, overrides, grid and output, plus --resume."""
    args = ["nst-lightning", "sweep"]
    if config is not None:
        args += ["--config", str(config)]
    for item in overrides or []:
        args += ["--set", item]
    for item in grid or []:
        args += ["--grid", item]
    if output is not None:
        args += ["--output", str(output)]
    if cell_px != 160:
        args += ["--cell-px", str(cell_px)]
    return shlex.join([*args, "--resume"])


def _load(config: Optional[Path], overrides: Optional[list[str]], output: Optional[Path] = None) -> api.RunConfig:
    extra = list(overrides or [])
    if output is not None:
        extra.append(f"output={output}")
    return api.load_config(config, extra)


def _show_api_messages() -> None:
    """Print the API's messages (logger ``nst_lightning``: ONNX providers, validation, warnings about the input
    or a damaged history) to stderr, one line each; warnings start with ``warning:``."""
    import logging

    class OneLine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:  # sys.stderr as it is now, not as it was when added
            text = for_cli(record.getMessage()).replace("\r", "\\r").replace("\n", "\\n")
            typer.echo(f"warning: {text}" if record.levelno >= logging.WARNING else text, err=True)

    logger = logging.getLogger("nst_lightning")
    if not logger.handlers:
        logger.addHandler(OneLine())
    logger.setLevel(logging.INFO)


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
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a previous run in the output directory (batch: redo finished images).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Stylise the content image; writes OUTPUT/final.png, snapshots, checkpoints, config and losses.

    With a folder, glob or list of images: one OUTPUT/<content>__<style>.png per pair, finished ones skipped.
    With a video file (or frames and video.enabled=true): OUTPUT/stylised.mp4 and OUTPUT/frames/000001.png, ...
    With a folder, glob or list of video files: OUTPUT/<clip>__<style>/ per pair, clips shared out over devices.
    Ctrl-C or SIGTERM stops after the current step, saving checkpoints/last.ckpt and interrupted.png
    (exit code 130 or 143); bad input or a failure exits with code 2.
    """
    try:
        cfg = _load(config, set_, output)
        _show_api_messages()
        result = api.run(cfg, resume=resume, overwrite=overwrite, progress=not quiet)
    except RunInterrupted as err:
        hint = f"resume with: {_resume_command(config, set_, output)}" if err.resumable else for_cli(err.hint)
        echo_error(f"{for_cli(err.summary)}; {hint}", prefix="")  # the command is already in flags: not translated
        raise typer.Exit(EXIT_SIGNAL + err.signum) from None
    except NSTError as err:
        raise fail(str(err)) from None
    except KeyboardInterrupt:
        raise fail("interrupted; the files written so far are intact", EXIT_SIGNAL + signal.SIGINT) from None
    _say_written(cfg.kind, result)


def _say_written(kind: str, result: Any) -> None:
    """What a finished run wrote: the image, the clip's video and frames, or (rank zero) a folder's summary;
    exit code 1 when any image or clip of a folder failed."""
    if kind == "image":
        typer.echo(f"wrote {result.final}")
    elif kind == "clip":
        if result.video.is_file():
            count = len(list(result.frames.glob("*.png")))
            typer.echo(f"wrote {result.video} and {count} frames in {result.frames}")
    else:
        if result.is_global_zero:
            typer.echo("\n".join(result.lines()))
        if result.failed:
            raise typer.Exit(EXIT_SOME_FAILED)


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
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a stopped sweep: keep finished cells, resume the others.")
    ] = False,
    cell_px: Annotated[int, typer.Option("--cell-px", help="Width of each cell in the contact sheet, 32-1024 px.")] = 160,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run every combination of --grid values; writes OUTPUT/contact_sheet.png, sweep.csv and cells/NN/."""
    try:
        if not 32 <= cell_px <= 1024:
            raise NSTError(f"--cell-px {cell_px} is out of range; give 32 to 1024 pixels")
        cfg = _load(config, set_, output)
        values, cells = api.grid(cfg, grid or [])
        _show_api_messages()

        def announce(cell, total: int) -> None:
            where = ", ".join(f"{k}={v}" for k, v in cell.values.items())
            typer.echo(f"cell {cell.index + 1}/{total}: {where}")

        outputs = api.sweep(
            cfg, values, overwrite=overwrite, resume=resume, progress=not quiet, on_cell=announce, cell_px=cell_px
        )
    except RunInterrupted as err:
        again = _sweep_resume_command(config, set_, grid, output, cell_px)
        raise fail(f"{err.summary}; continue the sweep with: {again}", EXIT_SIGNAL + err.signum, prefix="") from None
    except NSTError as err:
        raise fail(str(err)) from None
    except KeyboardInterrupt:
        again = _sweep_resume_command(config, set_, grid, output, cell_px)
        raise fail(f"interrupted; continue the sweep with: {again}", EXIT_SIGNAL + signal.SIGINT) from None
    typer.echo(f"wrote {outputs.sheet} ({len(cells)} cells)")


@app.command("print-config")
def print_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults, file and --set overrides) as YAML."""
    try:
        cfg = _load(config, set_)
    except NSTError as err:
        raise fail(str(err)) from None
    typer.echo(api.dump_config(cfg), nl=False)


@app.command()
def export(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help="Graph path (default export/vgg19_<weights>_<pooling>_to_<layer>.onnx).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing graph.")] = False,
) -> None:
    """Export the configured VGG19 feature extractor as an ONNX graph (opset 18) plus a JSON sidecar."""
    try:
        cfg = _load(config, set_)
        path, info = api.export(cfg, output, overwrite=overwrite)
    except NSTError as err:
        raise fail(str(err)) from None
    spec = info.extractor
    typer.echo(
        f"wrote {path} and {api.sidecar(path).name}: outputs {', '.join(spec.layers)}; weights {spec.weights}, "
        f"{spec.preprocessing.name} preprocessing, {spec.pooling} pooling; height and width >= {info.min_side} px; "
        f"opset {info.opset}; onnx.checker full check passed"
    )


@app.command("validate-onnx")
def validate_onnx(
    model: Annotated[Path, typer.Argument(help="Graph written by `nst-lightning export`.", show_default=False)],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    size: Annotated[
        Optional[list[int]],
        typer.Option(
            "--size", help="Image size to compare at (repeatable; default image.size and half of it).", show_default=False
        ),
    ] = None,
    rtol: Annotated[
        Optional[float],
        typer.Option(
            "--rtol",
            min=0.0,
            help="Max abs error allowed per layer, relative to its largest activation (default 1e-3).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Compare an exported graph (onnxruntime) with the torch extractor per layer; exit 1 past the tolerance."""
    try:
        cfg = _load(config, set_)
        report = api.validate(cfg, model, size, rtol)
    except NSTError as err:
        raise fail(str(err)) from None
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        worst = ", ".join(e.layer for e in report.failed)
        typer.echo(f"error: {model} disagrees with the torch extractor past rtol {report.rtol:g} at {worst}", err=True)
        raise typer.Exit(EXIT_MISMATCH)


@app.command()
def estimate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Estimate a run's peak memory from the image headers (nothing decoded) and the largest size that fits."""
    try:
        text = api.estimate(_load(config, set_))
    except NSTError as err:
        raise fail(str(err)) from None
    typer.echo(text)


def run() -> None:
    """Console-script entry point."""
    sys.exit(app())
