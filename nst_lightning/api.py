"""The Python API, and the only module the CLI imports: ``run(config)`` runs whatever kind of run the config
describes; ``sweep``, ``export``, ``validate`` and ``estimate`` do the other commands.

Torch-free at import (config errors and ``print-config`` answer at once); each function imports the run code it
needs. The names of earlier releases stay: ``fit`` (one image), ``fit_batch``, ``fit_clip``, ``fit_clips``, and
the builders ``load_images``, ``build_module``, ``build_trainer``, ``export_features``, ``validate_graph`` and
``onnx_targets``.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .allocator import request_huge_pages
from .config import RunConfig, dump_config, load_config
from .errors import CheckpointError, ConfigError, NSTError, RunInterrupted, for_cli
from .sweep import grid_cells, parse_grid, sweep

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

    from .folder import BatchReport
    from .export import ExportInfo, ValidationReport
    from .rundir import RunOutputs
    from .sweep import Cell
    from .video import ClipOutputs

__all__ = [
    "NSTError", "RunConfig", "RunInterrupted", "dump_config", "estimate", "export", "for_cli", "grid", "load_config", "run",
    "sidecar", "sweep", "validate",
]

_MOVED = {
    "fit": ("runs", "run_image"),
    "fit_batch": ("runs", "run_folder"),
    "fit_clip": ("runs", "run_clip"),
    "fit_clips": ("runs", "run_clips"),
    "load_images": ("inputs", "load_images"),
    "load_masks": ("inputs", "load_masks"),
    "init_input": ("inputs", "init_input"),
    "input_warnings": ("inputs", "input_warnings"),
    "build_module": ("inputs", "build_module"),
    "build_trainer": ("session", "build_trainer"),
    "export_features": ("export", "export_features"),
    "validate_graph": ("export", "validate_graph"),
    "onnx_targets": ("export", "onnx_targets"),
}
"""Names this module had before the runs moved to ``runs``, ``inputs`` and ``session``: still importable here."""


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module, attr = _MOVED[name]
        return getattr(import_module(f".{module}", __package__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(
    config: RunConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    verbose: bool = False,
) -> RunOutputs | ClipOutputs | BatchReport:
    """Run what ``config`` describes (``config.kind``): one image, a folder of images, a clip or a folder of clips.

    ``resume="last"`` continues the run in ``output`` whatever its kind (and is refused where there is none to
    continue); a single image also takes a checkpoint path. Folders continue without it too: running one again
    skips what is finished. Returns the image's or clip's outputs, or the report of a folder.
    """
    kind = config.kind
    if resume is not None and kind in ("folder", "clips"):
        check_folder_resume(config, resume, overwrite)
    request_huge_pages(config.image.size)  # before torch allocates (it reads the switch once)
    from . import runs

    common: dict[str, Any] = {"overwrite": overwrite, "progress": progress, "callbacks": callbacks, "verbose": verbose}
    if kind == "image":
        return runs.run_image(config, resume=resume, **common)
    if kind == "clip":
        return runs.run_clip(config, resume=resume, **common)
    if kind == "folder":
        return runs.run_folder(config, **common)
    return runs.run_clips(config, **common)


def check_folder_resume(config: RunConfig, resume: str, overwrite: bool) -> None:
    """Refuse a ``resume`` a folder run cannot honour: a checkpoint path (its groups have their own), together with
    ``overwrite``, or on a folder holding no run of its kind to continue."""
    from .kinds import held_kind

    unit = "clips" if config.kind == "clips" else "images"
    if resume != "last":
        raise ConfigError(
            f'resume="{resume}" names a checkpoint, which only a single-image run resumes from; a folder of {unit} '
            'continues with resume="last" (or by running it again: finished ones are skipped)'
        )
    if overwrite:
        from .rundir import RESUME_AND_OVERWRITE

        raise ConfigError(RESUME_AND_OVERWRITE)
    if held_kind(Path(config.output)) != config.kind:
        raise CheckpointError(f"no folder of {unit} to resume in {config.output}; run without resume= to start it")


def grid(config: RunConfig, items: Sequence[str]) -> tuple[dict[str, list[Any]], list[Cell]]:
    """``--grid key=v1,v2`` items as a grid and its validated cells, checked before anything runs (no torch)."""
    values = parse_grid(items)
    return values, grid_cells(config, values)


def export(config: RunConfig, path: str | Path | None = None, *, overwrite: bool = False) -> tuple[Path, ExportInfo]:
    """Export the config's feature extractor as a checked ONNX graph plus its JSON sidecar."""
    from .export import export_features

    return export_features(config, path, overwrite=overwrite)


def validate(
    config: RunConfig, graph: str | Path, sizes: Sequence[int] | None = None, rtol: float | None = None
) -> ValidationReport:
    """Compare an exported graph (onnxruntime) with the config's torch extractor per layer."""
    from .export import validate_graph

    return validate_graph(config, graph, sizes, rtol)


def estimate(config: RunConfig) -> str:
    """A run's peak memory estimate from the image or video headers (nothing decoded) and the largest size that fits;
    for a folder of images or clips, that of its largest content (with a group of images as large as a device takes)."""
    from .images import read_size
    from .resources import summary

    kind = config.kind
    if kind == "image":
        return summary(config, read_size(config.content), [read_size(s) for s in config.styles])
    from .folder import images_per_device, largest_pair
    from .pairs import expand_pairs
    from .videoio import frame_size

    if kind == "clip":
        shape = frame_size(config.contents)
        return f"clip {config.contents[0]}: frames {shape[1]}x{shape[0]}\n" + summary(
            config, shape, [read_size(s) for s in config.styles]
        )
    pairs = expand_pairs(config, clips=kind == "clips")
    size = read_size if kind == "folder" else lambda clip: frame_size([clip])
    largest = largest_pair(pairs, size)
    shape = size(largest.content)
    batch = min(images_per_device(config), len(pairs)) if kind == "folder" else 1
    unit = "images" if kind == "folder" else "clips"
    together = f", optimised {batch} at a time" if batch > 1 else ""
    return f"{len(pairs)} {unit}; the largest is {largest.content} ({shape[1]}x{shape[0]}){together}\n" + summary(
        config, shape, [read_size(s) for s in largest.styles], batch=batch
    )


def sidecar(graph: Path) -> Path:
    """The JSON file written beside an exported graph."""
    from .export import sidecar_path

    return sidecar_path(graph)
