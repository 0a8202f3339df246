"""ONNX export of the VGG19 feature extractor, the metadata it carries, the onnxruntime runner and validation.

Plain PyTorch plus onnx/onnxruntime (imported only when used), knowing no config: ``nst_lightning.export``
applies it to a run's config. The graph takes one RGB ``[0, 1]`` NCHW
image of any height and width from ``min_side`` up, applies the weights' preprocessing, and returns one
named output per layer. What it was exported from (layers, weights, pooling, preprocessing) is written
into the model's ``metadata_props`` and into a JSON sidecar, so a graph can be matched to a config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import OnnxError
from .features import Preprocessing, VGGFeatures, min_side
from .atomic import replace_atomically, write_text_atomic
from .layers import LAYER_INDEX



log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "image"
METADATA_KEY = "nst_lightning"
FORMAT = "nst-lightning/vgg19-features"
FORMAT_VERSION = 1
DEFAULT_RTOL = 1e-3
"""Allowed max abs error per layer, relative to the largest activation of that layer in the reference."""

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
EXTRAS_HINT = "install it with `pip install 'nst-lightning[onnx]'` (or '[onnx-gpu]' on a CUDA machine)"


def require(module: str, purpose: str) -> Any:
    """Import an optional ONNX package, or raise OnnxError naming the extra that provides it."""
    from importlib import import_module

    try:
        return import_module(module)
    except ImportError:
        raise OnnxError(f"{purpose} needs the '{module}' package; {EXTRAS_HINT}") from None


def network_order(layers: Sequence[str]) -> tuple[str, ...]:
    """Layer names without repeats, in the order the network computes them (the graph's output order)."""
    return tuple(sorted(set(layers), key=LAYER_INDEX.__getitem__))


def weights_digest(extractor: VGGFeatures) -> str:
    """A hash of the extractor's convolution weights: tells two weight sets apart whatever their file names."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in extractor.net.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ExtractorSpec:
    """What a graph must share with the torch extractor it stands in for."""

    layers: tuple[str, ...]
    weights: str
    weights_digest: str
    pooling: str
    preprocessing: Preprocessing
    padding: str = "zeros"

    @classmethod
    def of(cls, extractor: VGGFeatures, weights: str) -> ExtractorSpec:
        """The spec of a built extractor; ``weights`` is the source it was loaded from (caffe, torchvision, path)."""
        return cls(
            network_order(extractor.layers),
            weights,
            weights_digest(extractor),
            extractor.pooling,
            extractor.preprocessing,
            extractor.padding,
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ExtractorSpec:
        pre = raw["preprocessing"]
        return cls(
            layers=tuple(raw["layers"]),
            weights=str(raw["weights"]),
            weights_digest=str(raw["weights_digest"]),
            pooling=str(raw["pooling"]),
            preprocessing=Preprocessing(
                name=pre["name"],
                bgr=bool(pre["bgr"]),
                scale=float(pre["scale"]),
                mean=tuple(pre["mean"]),
                std=tuple(pre["std"]),
            ),
            padding=str(raw.get("padding", "zeros")),
        )

    def differences(self, wanted: ExtractorSpec) -> list[str]:
        """How this (a graph's) spec differs from ``wanted`` (the config's), one phrase per difference."""
        out = []
        if self.layers != wanted.layers:
            out.append(f"the graph has layers {', '.join(self.layers)} but the config needs {', '.join(wanted.layers)}")
        # The digest covers only the layers a graph computes: with other layers, only the sources can be compared.
        if self.layers == wanted.layers:
            same_weights = self.weights_digest == wanted.weights_digest
        else:
            same_weights = self.weights == wanted.weights
        if not same_weights:
            same = " (same name, other values)" if self.weights == wanted.weights else ""
            out.append(f"the graph has weights {self.weights} but the config uses {wanted.weights}{same}")
        if self.pooling != wanted.pooling:
            out.append(f"the graph has {self.pooling} pooling but the config uses {wanted.pooling}")
        if self.padding != wanted.padding:
            out.append(f"the graph has {self.padding} padding but the config uses {wanted.padding}")
        if self.preprocessing != wanted.preprocessing:
            theirs, ours = self.preprocessing.name, wanted.preprocessing.name
            same = " (same name, other constants)" if theirs == ours else ""
            out.append(f"the graph has {theirs} preprocessing but the config uses {ours}{same}")
        return out


@dataclass(frozen=True)
class ExportInfo:
    """The metadata of an exported graph, stored in its ``metadata_props`` and in the JSON sidecar."""

    extractor: ExtractorSpec
    min_side: int
    example_size: tuple[int, int]
    opset: int
    versions: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "extractor": asdict(self.extractor),
            "graph": {
                "input": INPUT_NAME,
                "input_layout": "NCHW float32, batch 1, RGB in [0, 1]; preprocessing is inside the graph",
                "outputs": list(self.extractor.layers),
                "dynamic_axes": {"2": "height", "3": "width"},
                "min_side": self.min_side,
                "example_size": list(self.example_size),
                "opset": self.opset,
                "exporter": "torch.onnx.export(dynamo=True)",
            },
            "versions": dict(self.versions),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ExportInfo:
        if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {raw.get('format')!r} version {raw.get('format_version')!r}")
        graph = raw["graph"]
        return cls(
            extractor=ExtractorSpec.from_dict(raw["extractor"]),
            min_side=int(graph["min_side"]),
            example_size=tuple(graph["example_size"]),
            opset=int(graph["opset"]),
            versions=dict(raw["versions"]),
        )


def sidecar_path(graph: str | os.PathLike[str]) -> Path:
    """Where the JSON metadata of ``graph`` lives: ``NAME.onnx.json`` beside it."""
    p = Path(graph)
    return p.with_name(p.name + ".json")


class _LayerTuple(nn.Module):
    """The extractor with its ``{layer: activation}`` dict flattened to a tuple in network order, for export."""

    def __init__(self, extractor: VGGFeatures) -> None:
        super().__init__()
        self.extractor = extractor
        self.layers = network_order(extractor.layers)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.extractor(image)
        return tuple(out[name] for name in self.layers)


def _versions() -> dict[str, str]:
    import onnx
    import onnxscript

    return {
        "nst_lightning": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "python": platform.python_version(),
    }


def export_onnx(extractor: VGGFeatures, path: str | os.PathLike[str], weights: str) -> ExportInfo:
    """Write ``extractor`` as a checked ONNX graph (opset 18, dynamic height and width) plus its JSON sidecar.

    ``weights`` names the source the extractor was loaded from; it is recorded, not loaded. The graph is
    self-contained (VGG19's weights are far below protobuf's 2 GB limit, so no external data file) and is
    written atomically after ``onnx.checker``'s full check passes.
    """
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    import onnx

    path = Path(path)
    side = min_side(extractor.layers)
    example = (2 * side, 3 * side)  # unequal sides, so the exporter cannot tie height to width
    info = ExportInfo(ExtractorSpec.of(extractor, weights), side, example, OPSET, _versions())
    model = _LayerTuple(extractor).eval()
    dims = {2: torch.export.Dim("height", min=side), 3: torch.export.Dim("width", min=side)}
    program = torch.onnx.export(
        model,
        (torch.rand(1, 3, *example),),
        None,
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=list(model.layers),
        dynamic_shapes=(dims,),
        verbose=False,
    )
    program.model.metadata_props[METADATA_KEY] = json.dumps(info.to_dict(), sort_keys=True)

    def write_graph(tmp: Path) -> None:
        program.save(tmp, external_data=False)
        onnx.checker.check_model(str(tmp), full_check=True)

    replace_atomically(path, write_graph)
    write_text_atomic(sidecar_path(path), json.dumps(info.to_dict(), indent=2) + "\n")
    return info


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build offers it (``onnxruntime-gpu``), the CPU always."""
    ort = require("onnxruntime", "running an ONNX graph")
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


class OnnxFeatures:
    """An exported graph run by onnxruntime, called like ``VGGFeatures``: image -> ``{layer: activation}``.

    ``providers`` defaults to :func:`default_providers`; ``self.providers`` is what the session really uses
    (onnxruntime-gpu falls back to the CPU where CUDA cannot load).
    """

    def __init__(self, path: str | os.PathLike[str], providers: Sequence[str] | None = None) -> None:
        ort = require("onnxruntime", "running an ONNX graph")
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxError(f"ONNX graph {self.path} does not exist; write one with `nst-lightning export --config CONFIG`")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the providers used are reported; onnxruntime's own warnings are not needed
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=list(providers or default_providers())
            )
        except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid models
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OnnxError(
                f"cannot load ONNX graph {self.path} ({first}); re-export it with `nst-lightning export`"
            ) from None
        self.info = self._read_info()
        self.layers = tuple(o.name for o in self.session.get_outputs())
        if self.layers != self.info.extractor.layers:
            raise OnnxError(
                f"ONNX graph {self.path} has outputs {', '.join(self.layers)} but its metadata lists "
                f"{', '.join(self.info.extractor.layers)}; re-export it with `nst-lightning export`"
            )

    @property
    def providers(self) -> list[str]:
        """The execution providers onnxruntime actually uses for this graph, preferred first."""
        return list(self.session.get_providers())

    def _read_info(self) -> ExportInfo:
        """The metadata inside the graph, or else in its sidecar; a graph with neither cannot be matched."""
        text = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        source = "its metadata"
        if text is None and sidecar_path(self.path).is_file():
            text = sidecar_path(self.path).read_text(encoding="utf-8")
            source = str(sidecar_path(self.path))
        if text is None:
            raise OnnxError(
                f"ONNX graph {self.path} carries no nst-lightning metadata and has no {sidecar_path(self.path).name} "
                "sidecar, so it cannot be matched to a config; export it with `nst-lightning export --config CONFIG`"
            )
        try:
            return ExportInfo.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError) as err:
            raise OnnxError(
                f"the nst-lightning metadata of {self.path} ({source}) is unreadable ({err}); "
                "re-export it with `nst-lightning export`"
            ) from None

    def check_matches(self, wanted: ExtractorSpec) -> None:
        """Raise OnnxError naming every difference between this graph's extractor and ``wanted``."""
        diffs = self.info.extractor.differences(wanted)
        if diffs:
            raise OnnxError(
                f"ONNX graph {self.path} does not match the config: {'; '.join(diffs)}; "
                "re-export it with `nst-lightning export --config CONFIG` or point features.onnx at a matching graph"
            )

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run ``image`` ``(1, 3, H, W)`` through the graph; activations come back on the image's device."""
        if min(image.shape[-2:]) < self.info.min_side:
            raise OnnxError(
                f"a {image.shape[-1]}x{image.shape[-2]} image is below the {self.info.min_side} px per side "
                f"the layers of {self.path} need; use a larger image"
            )
        array = image.detach().float().cpu().contiguous().numpy()
        outputs = self.session.run(list(self.layers), {INPUT_NAME: array})
        return {name: torch.from_numpy(out).to(image.device) for name, out in zip(self.layers, outputs)}


@dataclass(frozen=True)
class LayerError:
    """The worst disagreement for one layer over all validation inputs."""

    layer: str
    max_abs: float
    scale: float
    worst_input: str

    @property
    def relative(self) -> float:
        """Max abs error over the reference's largest activation magnitude; inf for NaN or mismatched shapes."""
        if math.isnan(self.max_abs):
            return math.inf
        if self.scale > 0:
            return self.max_abs / self.scale
        return math.inf if self.max_abs else 0.0


@dataclass(frozen=True)
class ValidationReport:
    """Per-layer errors of an ONNX graph against the torch extractor, and the providers that ran it."""

    graph: Path
    providers: list[str]
    inputs: list[str]
    layers: list[LayerError]
    rtol: float

    @property
    def failed(self) -> list[LayerError]:
        """Layers past the tolerance."""
        return [e for e in self.layers if e.relative > self.rtol]

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        """A human-readable table: providers, inputs, then one line per layer."""
        out = [
            f"graph:     {self.graph}",
            f"providers: {', '.join(self.providers)}",
            f"inputs:    {', '.join(self.inputs)}",
            f"{'layer':<9} {'max abs err':>12} {'max |ref|':>11} {'relative':>10}  {'':4} worst input",
        ]
        for e in self.layers:
            verdict = "FAIL" if e.relative > self.rtol else "ok"
            out.append(f"{e.layer:<9} {e.max_abs:12.3e} {e.scale:11.4g} {e.relative:10.2e}  {verdict:4} {e.worst_input}")
        status = "passed" if self.ok else f"FAILED ({len(self.failed)} of {len(self.layers)} layers)"
        out.append(f"{status}: tolerance {self.rtol:g} relative to each layer's largest activation")
        return out


@torch.no_grad()
def validate_onnx(
    graph: OnnxFeatures, extractor: VGGFeatures, inputs: Mapping[str, torch.Tensor], rtol: float = DEFAULT_RTOL
) -> ValidationReport:
    """Run each labelled input through ``graph`` (onnxruntime) and ``extractor`` (torch, fp32) and compare per layer."""
    missing = [name for name in graph.layers if name not in extractor.layers]
    if missing:
        raise OnnxError(f"ONNX graph {graph.path} returns layers {missing} the torch extractor does not compute")
    device = extractor.normalize.offset.device
    worst: dict[str, LayerError] = {}
    for label, image in inputs.items():
        got = graph(image)
        ref = extractor(image.float().to(device))
        for name in graph.layers:
            r, g = ref[name].float().cpu(), got[name].float().cpu()
            scale = r.abs().max().item()
            max_abs = (g - r).abs().max().item() if g.shape == r.shape else math.inf
            err = LayerError(name, max_abs, scale, label)
            if name not in worst or err.relative > worst[name].relative:
                worst[name] = err
    return ValidationReport(graph.path, graph.providers, list(inputs), [worst[n] for n in graph.layers], rtol)
