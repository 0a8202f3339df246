"""VGG19 layer names, their positions in ``torchvision.models.vgg19().features`` and aliases.

Pure Python (no torch) so that the config schema can validate layer names instantly.
"""

from __future__ import annotations

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
