"""VGG19 layer names, their positions in ``torchvision.models.vgg19().features`` and aliases.

Pure Python (no torch) so that the config schema can validate layer names instantly and the memory plan can
size tiles: strides, receptive reach and output shapes of the layers are here too.
"""

from __future__ import annotations

from collections.abc import Sequence

_BLOCKS = (2, 2, 4, 4, 4)


def _build_table() -> tuple[str, ...]:
    names: list[str] = []
    for block, convs in enumerate(_BLOCKS, start=1):
        for i in range(1, convs + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return tuple(names)


LAYER_NAMES: tuple[str, ...] = _build_table()
"""Canonical names in network order; the index is the position in ``vgg19().features``."""

LAYER_INDEX: dict[str, int] = {name: i for i, name in enumerate(LAYER_NAMES)}

CONV_INDICES: tuple[int, ...] = tuple(i for i, n in enumerate(LAYER_NAMES) if n.startswith("conv"))
"""Positions of the 16 convolutions (0, 2, 5, 7, 10, ...), the keys of a torchvision state dict."""

KERAS_CONV_NAMES: tuple[str, ...] = tuple(
    f"block{n[4]}_conv{n[6]}" for n in LAYER_NAMES if n.startswith("conv")
)


def _aliases() -> dict[str, str]:
    # Keras' Conv2D layers carry their ReLU, so ``block5_conv2`` is the activation after relu5_2.
    out: dict[str, str] = {}
    for name in LAYER_NAMES:
        kind, block = name[:4], name[4]
        if kind == "relu":
            out[f"block{block}_conv{name[6]}"] = name
        elif kind == "pool":
            out[f"block{block}_pool"] = name
    return out


ALIASES: dict[str, str] = _aliases()


def canonical_layer(name: str) -> str:
    """Return the canonical name of ``name`` (``block5_conv2`` -> ``relu5_2``); raise ValueError if unknown."""
    if name in LAYER_INDEX:
        return name
    if name in ALIASES:
        return ALIASES[name]
    from difflib import get_close_matches

    hint = get_close_matches(name, [*LAYER_NAMES, *ALIASES], n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ValueError(f"unknown VGG19 layer {name!r}{suggestion} (valid: conv1_1..pool5, relu4_2, block5_conv2, ...)")


def deepest(layers: list[str] | tuple[str, ...]) -> int:
    """Index of the deepest layer among canonical ``layers``: the network is cut after it."""
    return max(LAYER_INDEX[name] for name in layers)


def stride(layer: str) -> int:
    """Input pixels per position of ``layer``'s output: 2 to the number of poolings up to and including it."""
    return 2 ** sum(1 for name in LAYER_NAMES[: LAYER_INDEX[layer] + 1] if name.startswith("pool"))


def receptive_radius(layer: str) -> int:
    """How far (input pixels) a tile's cut edge changes ``layer``'s output inward, for a tile aligned to its stride.

    Each 3x3 convolution at stride ``s`` reaches ``s`` pixels further; a 2x2 pooling's output is changed where
    either of its inputs is, so the reach rounds up to the pooling's output stride. To relu5_1: 80 px.
    """
    reach, step = 0, 1
    for name in LAYER_NAMES[: LAYER_INDEX[layer] + 1]:
        if name.startswith("conv"):
            reach += step
        elif name.startswith("pool"):
            step *= 2
            reach = -(-reach // step) * step
    return reach


def _deepest(layers: Sequence[str]) -> str:
    return max(layers, key=LAYER_INDEX.__getitem__)


def alignment(layers: Sequence[str]) -> int:
    """The grid step tiles and halos are multiples of: the pooling stride of the deepest of ``layers``."""
    return stride(_deepest(layers))


def halo(layers: Sequence[str]) -> int:
    """Input pixels a tile carries on each side: the deepest layer's receptive radius rounded up to the grid step."""
    step = alignment(layers)
    return -(-receptive_radius(_deepest(layers)) // step) * step


def aligned_tile(tile: int, layers: Sequence[str]) -> int:
    """``tile`` rounded up to the grid step (at least one step)."""
    step = alignment(layers)
    return max(step, -(-tile // step) * step)


def layer_shape(height: int, width: int, layer: str) -> tuple[int, int]:
    """The ``(h, w)`` of ``layer``'s output for a ``height x width`` input (each pooling floors)."""
    for name in LAYER_NAMES[: LAYER_INDEX[layer] + 1]:
        if name.startswith("pool"):
            height, width = height // 2, width // 2
    return height, width
