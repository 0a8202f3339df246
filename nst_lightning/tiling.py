"""Exact tiled evaluation of the style transfer loss: peak memory set by the tile, not by the image.

Plain PyTorch. A style Gram is a sum over positions, so it can be accumulated tile by tile; once every
Gram is known, the loss's gradient with respect to a layer's features is local (``dL/dF = (K + K^T) F / Z``
with ``K = dL/dG``), as are the content term's. One evaluation therefore runs

1. a pass without autograd over every tile, summing each layer's Gram (and the content errors) over the
   tile's interior;
2. a pass with autograd tile by tile on a surrogate whose gradient is the loss's: the content term of the
   interior plus ``<K, X X^T> / Z`` per style layer with ``K`` from the global Grams, whose input gradient
   (halo included) is added into the image's gradient where the tile's input lay.

Interior features equal the whole image's when a tile's input carries a halo as wide as the receptive field
of the deepest layer used (80 px to relu5_1) and the grid is aligned to that layer's pooling stride, so that every pooling
window falls where it falls for the whole image; at the image's border the tile's padding is the image's own.
The pixel terms (total variation, chroma, border, temporal) are computed on the whole image: they hold a few
copies of the 3-channel image, which the optimiser keeps many of anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import aligned_tile, halo, layer_shape, stride
from .gram import gram_matrix, layer_mask
from .losses import StyleTransferLoss, style_layer_loss, temporal_loss

TILED_STYLE_LOSSES = ("relative", "paper", "keras", "mean_chw")
"""Style loss kinds that are functions of the Gram alone, the ones a tiled evaluation reproduces exactly."""
Features = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class Tile:
    """One tile: its interior ``[y0, y1) x [x0, x1)`` and the input it is computed from (interior plus halo)."""

    y0: int
    y1: int
    x0: int
    x1: int
    iy0: int
    iy1: int
    ix0: int
    ix1: int

    def input_of(self, image: torch.Tensor) -> torch.Tensor:
        """The tile's input cut from a ``(B, C, H, W)`` image."""
        return image[..., self.iy0 : self.iy1, self.ix0 : self.ix1]

    def window(self, layer: str, full: Sequence[int]) -> tuple[int, int, int, int]:
        """The interior on ``layer``'s whole ``(h, w)`` grid: rows ``[a, b)``, columns ``[c, d)``."""
        s = stride(layer)
        return self.y0 // s, min(full[0], self.y1 // s), self.x0 // s, min(full[1], self.x1 // s)

    def interior(self, features: torch.Tensor, layer: str, full: Sequence[int]) -> torch.Tensor:
        """The interior of a layer's output computed from this tile's input; ``full`` is the layer's whole ``(h, w)``."""
        a, b, c, d = self.window(layer, full)
        oy, ox = self.iy0 // stride(layer), self.ix0 // stride(layer)
        return features[..., a - oy : b - oy, c - ox : d - ox]

    def crop(self, full_grid: torch.Tensor, layer: str) -> torch.Tensor:
        """The interior's part of a tensor on the layer's whole grid (a target or a mask)."""
        a, b, c, d = self.window(layer, full_grid.shape[-2:])
        return full_grid[..., a:b, c:d]


def gram_sum(features: torch.Tensor) -> torch.Tensor:
    """``F F^T`` summed over a tile interior's positions (the unnormalised Gram, fp32 or fp64); zeros for an
    interior with no positions at the layer, as the last rows of an image whose side is not a multiple of the
    layer's stride have (floor pooling drops them), where ``gram_matrix`` would divide 0 by 0."""
    positions = features.shape[-2] * features.shape[-1]
    if positions == 0:
        b, c = features.shape[:2]
        return features.new_zeros((b, c, c), dtype=torch.float64 if features.dtype == torch.float64 else torch.float32)
    return gram_matrix(features) * positions


def _spans(size: int, tile: int, margin: int) -> list[tuple[int, int, int, int]]:
    return [(a, min(size, a + tile), max(0, a - margin), min(size, a + tile + margin)) for a in range(0, size, tile)]


def tile_grid(height: int, width: int, tile: int, layers: Sequence[str]) -> list[Tile]:
    """The tiles covering a ``height x width`` input, interiors ``tile`` px (aligned) with the halo ``layers`` need."""
    side, margin = aligned_tile(tile, layers), halo(layers)
    return [
        Tile(y0, y1, x0, x1, iy0, iy1, ix0, ix1)
        for y0, y1, iy0, iy1 in _spans(height, side, margin)
        for x0, x1, ix0, ix1 in _spans(width, side, margin)
    ]


def content_coefficient(target: torch.Tensor, kind: str) -> torch.Tensor | float:
    """The factor ``c`` with ``content_loss(F, target, kind) = c * sum((F - target)^2)``, from the whole target."""
    if kind == "relative":
        return 1.0 / target.float().pow(2).sum().clamp_min(1e-12)
    if kind == "mse":
        return 1.0 / target.numel()
    if kind == "paper":
        return 0.5
    if kind == "sum":
        return 1.0
    raise ValueError(f"unknown content loss {kind!r}")


def check_tileable(criterion: StyleTransferLoss) -> None:
    """ValueError unless the criterion's style loss is one a tiled evaluation reproduces exactly."""
    if criterion.style_kind not in TILED_STYLE_LOSSES:
        raise ValueError(
            f"features.tile cannot evaluate style_loss {criterion.style_kind!r} by tiles; "
            f"use one of {', '.join(TILED_STYLE_LOSSES)} or features.tile=off"
        )


def _mask(criterion: StyleTransferLoss, group: int, layer: str) -> torch.Tensor | None:
    return getattr(criterion, f"mask{group}_{layer}")


def tiled_terms(
    network: nn.Module,
    criteria: Sequence[StyleTransferLoss],
    image: torch.Tensor,
    tile: int,
    with_margin: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    gradient: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Each image's loss terms (``(B,)`` tensors, as ``StyleTransferLoss`` names them) and, with ``gradient``,
    the gradient of their summed ``loss`` with respect to ``image``, evaluated tile by tile.

    ``image``: ``(B, 3, H, W)`` in ``[0, 1]``, one criterion per image (targets set); ``with_margin`` maps it to what
    the network sees (e.g. a mirrored margin; the pixel terms use ``image`` itself); ``tile``: interior side
    in pixels of what the network sees, rounded up to the grid step.
    """
    first = criteria[0]
    for criterion in criteria:
        check_tileable(criterion)
    content_layers, style_layers = first.content_layers, first.style_layers
    layers = [*content_layers, *style_layers]
    x = image.detach().float().requires_grad_(gradient)
    with torch.enable_grad() if gradient else torch.no_grad():
        seen = with_margin(x)
    flat = seen.detach()
    height, width = flat.shape[-2:]
    pixels = image.shape[-2] * image.shape[-1]
    full = {layer: layer_shape(height, width, layer) for layer in layers}
    grid = tile_grid(height, width, tile, layers)
    device = flat.device.type
    batch = range(len(criteria))
    groups = [range(len(c.group_weights)) for c in criteria]

    # pass 1: the Grams (unnormalised sums over positions) and the content errors, no autograd
    sums = {(i, g, l): None for i in batch for g in groups[i] for l in style_layers}
    errors = {(i, l): 0.0 for i in batch for l in content_layers}
    with torch.no_grad():
        for t in grid:
            feats = network(t.input_of(flat))
            with torch.autocast(device, enabled=False):
                for i, criterion in enumerate(criteria):
                    for l in content_layers:
                        f = t.interior(feats[l][i : i + 1], l, full[l]).float()
                        errors[i, l] = errors[i, l] + (f - t.crop(getattr(criterion, f"content_{l}"), l)).pow(2).sum()
                    for g in groups[i]:
                        for l in style_layers:
                            f = t.interior(feats[l][i : i + 1], l, full[l])
                            mask = _mask(criterion, g, l)
                            if mask is not None:
                                f = f.float() * t.crop(mask, l).float()
                            part = gram_sum(f)
                            sums[i, g, l] = part if sums[i, g, l] is None else sums[i, g, l] + part
            del feats

    # the loss from the global sums, and K = dL/dG for every Gram
    terms: dict[str, list[torch.Tensor]] = {"content": [], "style": [], "smoothness": []}
    slopes: dict[tuple[int, int, str], torch.Tensor] = {}
    norms: dict[tuple[int, int, str], torch.Tensor | float] = {}
    coefficients: dict[tuple[int, str], torch.Tensor | float] = {}
    with torch.autocast(device, enabled=False), torch.enable_grad():
        for i, criterion in enumerate(criteria):
            scale = criterion.content_weight / len(content_layers)
            content = flat.new_zeros((), dtype=torch.float32)
            for l in content_layers:
                target = getattr(criterion, f"content_{l}")
                coefficients[i, l] = scale * content_coefficient(target, criterion.content_kind)
                content = content + coefficients[i, l] * errors[i, l]
            style = flat.new_zeros((), dtype=torch.float32)
            grams = []
            for g, group_weight in zip(groups[i], criterion.group_weights):
                for l, weight in zip(style_layers, criterion.style_layer_weights):
                    positions = full[l][0] * full[l][1]
                    mask = _mask(criterion, g, l)
                    norm = mask.float().pow(2).sum().clamp_min(1e-8) if mask is not None else float(positions)
                    gram = (sums[i, g, l] / norm).requires_grad_(True)
                    style = style + criterion.style_weight * group_weight * weight * style_layer_loss(
                        gram, getattr(criterion, f"gram{g}_{l}"), positions, pixels, criterion.style_kind
                    )
                    grams.append(((g, l), gram))
                    norms[i, g, l] = norm
            if gradient:
                for ((g, l), _), slope in zip(grams, torch.autograd.grad(style, [gr for _, gr in grams])):
                    slopes[i, g, l] = slope
            terms["content"].append(content.detach())
            terms["style"].append(style.detach())

    # pass 2: tile by tile, the surrogate's input gradient added where the tile's input lay
    seen_grad = torch.zeros_like(flat) if gradient else None
    if gradient:
        for t in grid:
            piece = t.input_of(flat).detach().requires_grad_(True)
            feats = network(piece)
            with torch.autocast(device, enabled=False):
                surrogate = flat.new_zeros((), dtype=torch.float32)
                for i, criterion in enumerate(criteria):
                    for l in content_layers:
                        f = t.interior(feats[l][i : i + 1], l, full[l]).float()
                        target = t.crop(getattr(criterion, f"content_{l}"), l)
                        surrogate = surrogate + coefficients[i, l] * (f - target).pow(2).sum()
                    for g in groups[i]:
                        for l in style_layers:
                            f = t.interior(feats[l][i : i + 1], l, full[l])
                            mask = _mask(criterion, g, l)
                            if mask is not None:
                                f = f.float() * t.crop(mask, l).float()
                            surrogate = surrogate + (slopes[i, g, l] * gram_sum(f)).sum() / norms[i, g, l]
            (piece_grad,) = torch.autograd.grad(surrogate, piece)
            t.input_of(seen_grad).add_(piece_grad)
            del feats, surrogate, piece_grad

    # the pixel terms on the whole image, and the image's gradient through the margin
    with torch.autocast(device, enabled=False), torch.enable_grad() if gradient else torch.no_grad():
        local = x.new_zeros((), dtype=torch.float32)
        temporal = []
        for i, criterion in enumerate(criteria):
            xi = x[i : i + 1]
            tv = criterion.smoothness(xi)
            terms["smoothness"].append(tv.detach())
            local = local + tv
            if criterion.temporal_image is not None:
                term = criterion.temporal_weight * temporal_loss(xi, criterion.temporal_image, criterion.temporal_weights)
                temporal.append(term.detach())
                local = local + term
        grad = None
        if gradient:
            (grad,) = torch.autograd.grad((seen * seen_grad).sum() + local, x)
    out = {k: torch.stack(v) for k, v in terms.items()}
    out["loss"] = out["content"] + out["style"] + out["smoothness"]
    if temporal:
        out["temporal"] = torch.stack(temporal)
        out["loss"] = out["loss"] + out["temporal"]
    return out, grad


@torch.no_grad()
def tiled_features(network: Features, image: torch.Tensor, layers: Sequence[str], tile: int) -> dict[str, torch.Tensor]:
    """``layers``' whole activations of ``image`` assembled from tile interiors, no autograd (for large targets)."""
    height, width = image.shape[-2:]
    full = {layer: layer_shape(height, width, layer) for layer in layers}
    out: dict[str, torch.Tensor] = {}
    for t in tile_grid(height, width, tile, layers):
        feats = network(t.input_of(image))
        for layer in layers:
            f = feats[layer]
            if layer not in out:
                out[layer] = f.new_empty((*f.shape[:2], *full[layer]))
            t.crop(out[layer], layer).copy_(t.interior(f, layer, full[layer]))
    return out


@torch.no_grad()
def tiled_grams(network: Features, image: torch.Tensor, layers: Sequence[str], tile: int) -> dict[str, torch.Tensor]:
    """``gram_matrix`` of ``layers``' activations of ``image``, summed over tile interiors, no autograd."""
    height, width = image.shape[-2:]
    full = {layer: layer_shape(height, width, layer) for layer in layers}
    sums: dict[str, torch.Tensor] = {}
    for t in tile_grid(height, width, tile, layers):
        feats = network(t.input_of(image))
        with torch.autocast(image.device.type, enabled=False):
            for layer in layers:
                f = t.interior(feats[layer], layer, full[layer])
                part = gram_sum(f)
                sums[layer] = part if layer not in sums else sums[layer] + part
    return {layer: sums[layer] / (full[layer][0] * full[layer][1]) for layer in layers}


@torch.no_grad()
def tiled_targets(
    network: Features,
    criterion: StyleTransferLoss,
    content: torch.Tensor,
    styles: Sequence[torch.Tensor],
    tile: int,
    blend: Sequence[float] | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor | None | list[float]]:
    """What ``criterion.set_targets`` stores, computed tile by tile, in the form ``criterion.load_targets`` takes.

    ``content`` is what the network sees of the content image (margin included); the style Grams are summed
    over tiles, so neither a large content nor a large style image is ever run through the network whole.
    """
    content_layers, style_layers = criterion.content_layers, criterion.style_layers
    out: dict[str, torch.Tensor | None | list[float]] = {
        f"content_{layer}": f.float() for layer, f in tiled_features(network, content, content_layers, tile).items()
    }
    grams = [tiled_grams(network, s, style_layers, tile) for s in styles]
    weights = list(blend) if blend is not None else [1.0] * len(styles)
    if masks is None or all(m is None for m in masks):
        total = float(sum(weights))
        if len(weights) != len(styles) or total <= 0:
            raise ValueError(f"{len(weights)} blend weights for {len(styles)} style images, summing to more than 0")
        groups = [(1.0, None, {l: sum(g[l] * (b / total) for g, b in zip(grams, weights)) for l in style_layers})]
    else:
        mean = sum(weights) / len(weights)
        groups = [(w / mean, m, g) for w, m, g in zip(weights, masks, grams)]
    height, width = content.shape[-2:]
    for index, (_, mask, gram) in enumerate(groups):
        for layer in style_layers:
            out[f"gram{index}_{layer}"] = gram[layer]
            shape = layer_shape(height, width, layer)
            out[f"mask{index}_{layer}"] = None if mask is None else layer_mask(mask.to(content.device), shape)
    out["group_weights"] = [w for w, _, _ in groups]
    return out
