"""ONNX export and validation applied to a run's config: the export path, the validation images, the targets
computed by onnxruntime. The graph code itself (export, runner, validation) is ``nst_lightning.onnx_graph``, whose
names are importable here too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .atomic import check_writable, reporting_write_failures
from .config import all_layers
from .errors import ConfigError, OnnxError
from .features import VGGFeatures, extractor_for, min_side
from .inputs import load_images
from .onnx_graph import (
    CPU,
    CUDA,
    DEFAULT_RTOL,
    EXTRAS_HINT,
    ExportInfo,
    ExtractorSpec,
    FORMAT,
    FORMAT_VERSION,
    INPUT_NAME,
    LayerError,
    METADATA_KEY,
    OPSET,
    OnnxFeatures,
    ValidationReport,
    default_providers,
    export_onnx,
    network_order,
    require,
    sidecar_path,
    validate_onnx,
    weights_digest,
)

if TYPE_CHECKING:
    from .config import RunConfig
    from .module import StyleTransferModule

log = logging.getLogger(__name__)

__all__ = [
    "CPU",
    "CUDA",
    "DEFAULT_RTOL",
    "EXTRAS_HINT",
    "ExportInfo",
    "ExtractorSpec",
    "FORMAT",
    "FORMAT_VERSION",
    "INPUT_NAME",
    "LayerError",
    "METADATA_KEY",
    "OPSET",
    "OnnxFeatures",
    "ValidationReport",
    "default_providers",
    "export_onnx",
    "network_order",
    "require",
    "sidecar_path",
    "validate_onnx",
    "weights_digest",
    "build_config_extractor",
    "default_export_path",
    "export_features",
    "open_graph",
    "validate_graph",
    "validation_inputs",
    "onnx_targets",
]

def build_config_extractor(config: RunConfig) -> VGGFeatures:
    """The frozen VGG19 extractor for every layer ``config``'s loss uses, with its weights and preprocessing."""
    return extractor_for(config.features, all_layers(config))


def default_export_path(config: RunConfig) -> Path:
    """``export/vgg19_<weights>_<pooling>_to_<deepest layer>.onnx`` under the working directory."""
    weights = config.features.weights
    source = weights if weights in ("caffe", "torchvision") else Path(weights).stem
    return Path("export") / f"vgg19_{source}_{config.features.pooling}_to_{all_layers(config)[-1]}.onnx"


def export_features(
    config: RunConfig, path: str | Path | None = None, *, overwrite: bool = False
) -> tuple[Path, ExportInfo]:
    """Export ``config``'s feature extractor as a checked ONNX graph plus sidecar; returns its path and metadata.

    An existing graph is replaced only with ``overwrite``, so a re-export never silently changes what a
    config's ``features.onnx`` points at.
    """
    target = Path(path) if path is not None else default_export_path(config)
    if target.is_dir() or target.suffix != ".onnx":
        raise ConfigError(f"export output {target} is not a .onnx file path; give e.g. output=export/vgg19.onnx")
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; add overwrite=True to replace it or choose another output= path")
    check_writable(target.parent)  # before the costly export
    extractor = build_config_extractor(config)
    with reporting_write_failures():
        return target, export_onnx(extractor, target, config.features.weights)


def _label(name: str, image: torch.Tensor) -> str:
    return f"{name} {image.shape[-1]}x{image.shape[-2]}"


def _labelled(content: torch.Tensor, styles: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Images keyed as validation reports name them: ``content 320x240``, ``style 320x200`` (``style2 ...`` for several)."""
    out = {_label("content", content): content}
    for i, style in enumerate(styles, start=1):
        out[_label(f"style{i}" if len(styles) > 1 else "style", style)] = style
    return out


def validation_inputs(config: RunConfig, sizes: Sequence[int]) -> dict[str, torch.Tensor]:
    """The config's content and style images at each size (as ``image.size``), plus a seeded random image per size.

    The random images are odd-sized, so pooling that floors odd sides is exercised as well.
    """
    generator = torch.Generator().manual_seed(config.seed)
    side = min_side(all_layers(config))
    out: dict[str, torch.Tensor] = {}
    for size in sizes:
        sized = config.model_copy(update={"image": config.image.model_copy(update={"size": size})})
        out.update(_labelled(*load_images(sized)))
        noise = torch.rand(1, 3, max(side, size * 3 // 4 | 1), size, generator=generator)
        out[_label("random", noise)] = noise
    return out


def open_graph(config: RunConfig, path: str | Path, extractor: VGGFeatures) -> OnnxFeatures:
    """Load an exported graph with onnxruntime; refuse one exported for other layers, weights, pooling or preprocessing."""
    graph = OnnxFeatures(path)
    graph.check_matches(ExtractorSpec.of(extractor, config.features.weights))
    return graph


def validate_graph(
    config: RunConfig, path: str | Path, sizes: Sequence[int] | None = None, rtol: float | None = None
) -> ValidationReport:
    """Compare an exported graph with the torch extractor of ``config`` on its images and on random inputs.

    ``sizes`` defaults to ``image.size`` and half of it (never below what the layers need); ``rtol`` to
    ``DEFAULT_RTOL``.
    """
    extractor = build_config_extractor(config)
    graph = open_graph(config, path, extractor)
    side = min_side(extractor.layers)
    sizes = list(dict.fromkeys(sizes or [config.image.size, max(side, config.image.size // 2)]))
    small = [s for s in sizes if s < side]
    if small:
        raise ConfigError(
            f"size {small[0]} is below the {side} px the layers down to {all_layers(config)[-1]} need; "
            f"give --size {side} or more"
        )
    return validate_onnx(graph, extractor, validation_inputs(config, sizes), DEFAULT_RTOL if rtol is None else rtol)


def onnx_targets(config: RunConfig, module: StyleTransferModule, graph: OnnxFeatures | None = None) -> OnnxFeatures:
    """Compute the module's fixed targets with the graph at ``features.onnx``, validating it first if asked; returns
    the graph, which a clip passes back for its later frames (opened, validated and reported once).

    A graph that does not match the config, or (with ``features.validate_onnx``) disagrees with the torch
    extractor on this run's own images, is refused before anything is written.
    """
    if graph is not None:
        module.prepare_targets(graph)
        return graph
    graph = open_graph(config, config.features.onnx, module.extractor)
    report = None
    if config.features.validate_onnx:
        report = validate_onnx(graph, module.extractor, _labelled(module.content_image, module.style_images[0]))
        if not report.ok:
            worst = ", ".join(f"{e.layer} {e.relative:.2e}" for e in report.failed)
            raise OnnxError(
                f"ONNX graph {graph.path} disagrees with the torch extractor on this run's images (relative error "
                f"{worst} > {report.rtol:g}); re-export it with `nst-lightning export --config CONFIG --overwrite`"
            )
    module.prepare_targets(graph)
    log.info("ONNX graph %s: onnxruntime providers %s", graph.path, ", ".join(graph.providers))
    for line in report.lines() if report else []:
        log.info("%s", line)
    log.info("content features and style Grams computed with onnxruntime")
    return graph
