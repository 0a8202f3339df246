"""The Gatys et al. loss: content, style (Gram matrices) and total variation, always computed in fp32.

Functions hold the maths; ``StyleTransferLoss`` holds the fixed targets as buffers and returns the
weighted terms by name. Plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Features = Mapping[str, torch.Tensor]


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """``F F^T / M`` per image: ``(B, C, H, W) -> (B, C, C)`` in fp32 (fp64 stays fp64), M = H*W positions.

    Dividing by M lets a style image of any size be compared with the output; for equal sizes the
    style loss below equals the paper's ``1/(4 N^2 M^2) sum (G - A)^2`` on unnormalised Grams.
    """
    return _Gram.apply(features)


def _at_least_fp32(features: torch.Tensor) -> torch.Tensor:
    return features if features.dtype in (torch.float32, torch.float64) else features.float()


def _matrix(features: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The features as a matrix without copying the layout: ``(B, M, C)`` for channels_last, else ``(B, C, M)``."""
    b, c, h, w = features.shape
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        return features.permute(0, 2, 3, 1).reshape(b, h * w, c), True
    return features.reshape(b, c, h * w), False


GRAM_CHUNK = 4096
"""Positions cast to fp32 at a time: a chunk stays in cache between the cast and the matmul."""
FP32_OUTPUT_BMM_DEVICES = ("cuda",) if "dtype" in torch.ops.aten.bmm.overloads() else ()
"""Devices whose ``torch.bmm(..., out_dtype=torch.float32)`` (``aten::bmm.dtype``) multiplies bf16 with fp32
accumulation and output in one call; torch has it for CUDA only (none on the CPU)."""


class _Gram(torch.autograd.Function):
    """The Gram matrix in fp32 from features of any dtype and layout, with a backward of one matmul.

    Forward: on CUDA, bf16 features are multiplied in one cuBLAS call accumulating and writing fp32 (chunks
    would be ~1000 launches per Gram at 2048 px); elsewhere they are cast to fp32 a chunk of positions at a
    time and accumulated, so no fp32 copy of a whole layer is made or kept. Backward:
    ``dF = (dG + dG^T) F / M``, one matmul instead of autograd's two plus a transpose copy and a sum; for bf16 features it runs in bf16 (the gradient
    enters the bf16 network anyway), about 10x faster than casting up on the CPU.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, features: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features)
        with torch.autocast(features.device.type, enabled=False):
            return _Gram._gram(features)

    @staticmethod
    def _gram(features: torch.Tensor) -> torch.Tensor:
        x, positions_major = _matrix(features)
        m = features.shape[-2] * features.shape[-1]
        if x.dtype in (torch.float32, torch.float64):
            gram = torch.bmm(x.transpose(1, 2), x) if positions_major else torch.bmm(x, x.transpose(1, 2))
            return gram / m
        if x.device.type in FP32_OUTPUT_BMM_DEVICES:
            a, b = (x.transpose(1, 2), x) if positions_major else (x, x.transpose(1, 2))
            return torch.bmm(a, b, out_dtype=torch.float32) / m
        c = features.shape[1]
        gram = x.new_zeros((x.shape[0], c, c), dtype=torch.float32)
        for part in x.split(GRAM_CHUNK, dim=1 if positions_major else 2):
            part = part.float()
            if positions_major:
                gram.baddbmm_(part.transpose(1, 2), part)
            else:
                gram.baddbmm_(part, part.transpose(1, 2))
        return gram / m

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (features,) = ctx.saved_tensors
        with torch.autocast(features.device.type, enabled=False):
            return _Gram._gradient(features, grad)

    @staticmethod
    def _gradient(features: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        x, positions_major = _matrix(features)
        sym = (grad + grad.transpose(1, 2)) / (h * w)
        if x.dtype == torch.bfloat16:
            sym = sym.to(torch.bfloat16)
        else:
            x = _at_least_fp32(x)
        if positions_major:
            dx = torch.bmm(x, sym).reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:
            dx = torch.bmm(sym, x).reshape(b, c, h, w)
        return dx.to(features.dtype)


def guided_gram(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Gram matrix of the positions a ``(1, 1, H, W)`` mask selects (Gatys et al. 2017's guided Gram).

    Features are weighted by the mask and the Gram divided by the mask's mass ``sum(m^2)``, so it is
    the mean feature correlation over the region; without a mask it is ``gram_matrix``.
    """
    if mask is None:
        return gram_matrix(features)
    h, w = features.shape[-2:]
    weighted = _at_least_fp32(features) * mask.float()
    return gram_matrix(weighted) * (h * w) / mask.float().pow(2).sum().clamp_min(1e-8)


def layer_mask(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A ``(1, 1, H, W)`` mask in ``[0, 1]`` averaged down to a layer's ``(h, w)`` grid."""
    return F.interpolate(mask.float(), size=tuple(shape), mode="area").clamp(0.0, 1.0)


def content_loss(features: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``mse``: mean squared error; ``paper``: 1/2 sum of squares (Gatys et al.); ``sum``: sum of squares;
    ``relative``: squared error over the target's squared norm (scale-free, so weights carry across sizes)."""
    sq = (features.float() - target.float()).pow(2)
    if kind == "relative":
        return sq.sum() / target.float().pow(2).sum().clamp_min(1e-12)
    if kind == "mse":
        return sq.mean()
    if kind == "paper":
        return 0.5 * sq.sum()
    if kind == "sum":
        return sq.sum()
    raise ValueError(f"unknown content loss {kind!r}")


def style_layer_loss(
    gram: torch.Tensor, target: torch.Tensor, positions: int, image_pixels: int, kind: str = "paper"
) -> torch.Tensor:
    """Distance of two position-normalised Grams for one layer.

    ``paper``: ``sum (G - A)^2 / (4 N^2)`` with N channels (the paper's normalisation);
    ``keras``: the Keras example's ``sum (G' - A')^2 / (4 * 3^2 * P^2)`` on unnormalised Grams G', with
    P the image's pixel count; ``mean_chw``: the PyTorch tutorials' ``mean((G' - A')^2) / (N * M)`` on
    unnormalised Grams with M = ``positions``; ``relative``: ``|G - A|^2 / |A|^2``, the squared relative
    Gram error, so every layer counts alike whatever its activation scale.
    """
    sq = (gram - target).pow(2).sum()
    if kind == "relative":
        return sq / target.pow(2).sum().clamp_min(1e-12)
    if kind == "paper":
        channels = gram.shape[-1]
        return sq / (4.0 * channels**2)
    if kind == "keras":
        return sq * positions**2 / (4.0 * 9.0 * float(image_pixels) ** 2)
    if kind == "mean_chw":
        return sq * positions / float(gram.shape[-1]) ** 3
    raise ValueError(f"unknown style loss {kind!r}")


def tv_loss(image: torch.Tensor, kind: str = "keras") -> torch.Tensor:
    """Total variation of an RGB ``[0, 1]`` image measured in 8-bit pixel units (0..255).

    ``keras``: ``sum((dx^2 + dy^2)^1.25)`` as in the Keras example; ``squared``: ``sum(dx^2) + sum(dy^2)``.
    """
    x = image.float() * 255.0
    if kind == "keras":
        dy = (x[..., :-1, :-1] - x[..., 1:, :-1]).pow(2)
        dx = (x[..., :-1, :-1] - x[..., :-1, 1:]).pow(2)
        return (dx + dy).pow(1.25).sum()
    if kind == "squared":
        return (x[..., 1:, :] - x[..., :-1, :]).pow(2).sum() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).sum()
    raise ValueError(f"unknown total variation {kind!r}")


CHROMA = ((-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
"""Rows of the JPEG (full-range BT.601) RGB -> Cb, Cr matrix, as Pillow's ``YCbCr`` mode; offsets drop out of differences."""


def chroma_matrix(device: torch.device | str | None = None) -> torch.Tensor:
    """``CHROMA`` as a ``(2, 3)`` fp32 tensor: built once, before any step (a tensor made from Python data inside
    a step is a host-to-device copy, which CUDA graph capture refuses)."""
    return torch.tensor(CHROMA, dtype=torch.float32, device=device)


def chroma_tv_loss(image: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of Cb and Cr between neighbouring pixels, in 8-bit units, per image ``(B,)``.

    Smooths colour noise only: luminance, which carries the brush strokes and the content's detail, is free.
    A mean, so the same weight suits every image size as the relative losses do. ``matrix``: ``chroma_matrix()``
    on the image's device (made here when not given).
    """
    x = image.float() * 255.0
    cbcr = torch.einsum("kc,bchw->bkhw", chroma_matrix(x.device) if matrix is None else matrix, x)
    dy = (cbcr[..., 1:, :] - cbcr[..., :-1, :]).pow(2).sum(1).flatten(1)
    dx = (cbcr[..., :, 1:] - cbcr[..., :, :-1]).pow(2).sum(1).flatten(1)
    return (dy.sum(1) + dx.sum(1)) / (dy.shape[1] + dx.shape[1])


def border_tv_loss(image: torch.Tensor, lines: int = 8) -> torch.Tensor:
    """Squared difference between neighbouring pixel lines across each border, weighted from 1 at the edge down
    to ``1/lines`` at the ``lines``-th pair, 8-bit units, averaged over pixels and the four sides, per image ``(B,)``.

    VGG's zero padding makes the outermost lines the cheapest place for the optimiser to produce responses the
    style Grams ask for, and they grow into 1-2 px strips and a line-by-line ripple. Only differences across
    the edge count, so texture running along it is free; the taper leaves no step where the term ends.
    """
    x = image.float() * 255.0
    bands = [x[..., : lines + 1, :], x[..., -lines - 1 :, :].flip(-2)]
    bands += [b.transpose(-1, -2) for b in (x[..., :, : lines + 1], x[..., :, -lines - 1 :].flip(-1))]
    taper = torch.arange(lines, 0, -1, dtype=x.dtype, device=x.device).view(-1, 1) / lines
    return torch.stack([((b[..., 1:, :] - b[..., :-1, :]).pow(2) * taper).flatten(1).mean(1) for b in bands]).mean(0)


def temporal_loss(image: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Ruder et al.'s short-term temporal loss: ``sum c (x - w)^2 / D`` over the image's D values.

    ``target`` is the previous stylised frame warped to this one, ``weights`` (``(1, 1, H, W)``) is 0 where
    the warp cannot be trusted (disocclusions, motion boundaries) and 1 elsewhere; images in ``[0, 1]``.
    """
    return (weights.float() * (image.float() - target.float()).pow(2)).sum() / image.numel()


class TemporalTarget(NamedTuple):
    """What the temporal loss pulls a frame towards: the warped previous result, its weights, the term's weight."""

    image: torch.Tensor
    weights: torch.Tensor
    weight: float


def blend_grams(style_features: Sequence[Features], layers: Sequence[str], blend: Sequence[float]) -> dict[str, torch.Tensor]:
    """Per-layer Gram target mixing several style images with ``blend`` weights (normalised to sum 1).

    ``sum_s b_s |G - A_s|^2`` and ``|G - sum_s b_s A_s|^2`` differ by a constant, so one blended target
    gives the same gradients at a fraction of the cost.
    """
    if len(blend) != len(style_features):
        raise ValueError(f"{len(blend)} blend weights for {len(style_features)} style images")
    total = float(sum(blend))
    if total <= 0:
        raise ValueError("style blend weights must sum to more than 0")
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        out[layer] = sum(gram_matrix(f[layer]) * (b / total) for f, b in zip(style_features, blend))
    return out


class StyleTransferLoss(nn.Module):
    """Weighted content + style + TV loss against fixed targets (kept as non-persistent buffers).

    Style targets form groups: without masks one group holds the blended Grams of all style images;
    with masks each style image is its own group, compared through guided Grams over its region.
    """

    def __init__(
        self,
        content_layers: Sequence[str],
        style_layers: Sequence[str],
        style_layer_weights: Sequence[float],
        content_weight: float = 1.0,
        style_weight: float = 10.0,
        tv_weight: float = 0.0,
        content_loss: str = "relative",
        style_loss: str = "relative",
        tv_loss: str = "keras",
        chroma_weight: float = 0.0,
        border_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if len(style_layer_weights) != len(style_layers):
            raise ValueError("give one weight per style layer")
        self.content_layers = list(content_layers)
        self.style_layers = list(style_layers)
        self.style_layer_weights = [float(w) for w in style_layer_weights]
        self.content_weight = float(content_weight)
        self.style_weight = float(style_weight)
        self.tv_weight = float(tv_weight)
        self.content_kind = content_loss
        self.style_kind = style_loss
        self.tv_kind = tv_loss
        self.chroma_weight = float(chroma_weight)
        self.border_weight = float(border_weight)
        self.group_weights: list[float] = []
        for layer in self.content_layers:
            self.register_buffer(f"content_{layer}", None, persistent=False)
        self.temporal_weight = 0.0
        self.register_buffer("temporal_image", None, persistent=False)
        self.register_buffer("temporal_weights", None, persistent=False)
        self.register_buffer("chroma", chroma_matrix(), persistent=False)

    def set_temporal(self, target: TemporalTarget | None) -> None:
        """Add (or, with None, remove) the temporal term ``temporal`` pulling the image towards ``target.image``."""
        self.temporal_weight = 0.0 if target is None else float(target.weight)
        self.temporal_image = None if target is None else target.image.detach().float().clone()
        self.temporal_weights = None if target is None else target.weights.detach().float().clone()

    @property
    def has_targets(self) -> bool:
        """Whether ``set_targets`` has run."""
        return bool(self.group_weights)

    def targets(self) -> dict[str, torch.Tensor | None | list[float]]:
        """Every target tensor by name plus the group weights, to hand to ``load_targets`` of a like loss."""
        names = [f"content_{layer}" for layer in self.content_layers] + [
            f"{kind}{g}_{layer}" for g in range(len(self.group_weights)) for layer in self.style_layers for kind in ("gram", "mask")
        ]
        out: dict[str, torch.Tensor | None | list[float]] = {name: getattr(self, name) for name in names}
        out["group_weights"] = list(self.group_weights)
        return out

    def load_targets(self, targets: Mapping[str, torch.Tensor | None | list[float]]) -> None:
        """Reuse targets from ``targets()`` of a loss with the same layers, images and masks."""
        self._clear_groups()
        for name, value in targets.items():
            if name == "group_weights":
                continue
            self.register_buffer(name, value, persistent=False)
        self.group_weights = list(targets["group_weights"])

    def _clear_groups(self) -> None:
        for g in range(len(self.group_weights)):
            for layer in self.style_layers:
                delattr(self, f"gram{g}_{layer}")
                delattr(self, f"mask{g}_{layer}")
        self.group_weights = []

    @torch.no_grad()
    def set_targets(
        self,
        content_features: Features,
        style_features: Sequence[Features],
        blend: Sequence[float] | None = None,
        masks: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        """Store the content activations and the style Grams the output is pulled towards.

        ``masks`` (one ``(1, 1, H, W)`` mask or None per style, at the output's size) makes each style
        act only where its mask is white; ``blend`` then weights each style's term relative to the mean.
        """
        self._clear_groups()
        weights = list(blend) if blend is not None else [1.0] * len(style_features)
        with torch.autocast(next(iter(content_features.values())).device.type, enabled=False):
            for layer in self.content_layers:
                setattr(self, f"content_{layer}", content_features[layer].detach().float().clone())
            if masks is None or all(m is None for m in masks):
                groups = [(1.0, None, blend_grams(style_features, self.style_layers, weights))]
            else:
                if len(masks) != len(style_features):
                    raise ValueError(f"{len(masks)} masks for {len(style_features)} style images")
                mean = sum(weights) / len(weights)
                groups = [
                    (w / mean, m, {layer: gram_matrix(f[layer]) for layer in self.style_layers})
                    for w, m, f in zip(weights, masks, style_features)
                ]
            for g, (weight, mask, grams) in enumerate(groups):
                for layer in self.style_layers:
                    self.register_buffer(f"gram{g}_{layer}", grams[layer], persistent=False)
                    shape = content_features[layer].shape[-2:]
                    lm = None if mask is None else layer_mask(mask.to(grams[layer].device), shape)
                    self.register_buffer(f"mask{g}_{layer}", lm, persistent=False)
                self.group_weights.append(weight)

    def smoothness(self, image: torch.Tensor) -> torch.Tensor:
        """The ``tv`` term: weighted total variation, chroma smoothness and border smoothness (0 when no weight is set)."""
        tv = self.tv_weight * tv_loss(image, self.tv_kind) if self.tv_weight else image.new_zeros((), dtype=torch.float32)
        if self.chroma_weight:
            tv = tv + self.chroma_weight * chroma_tv_loss(image, self.chroma).sum()
        if self.border_weight:
            tv = tv + self.border_weight * border_tv_loss(image).sum()
        return tv

    def forward(self, features: Features, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted terms ``content``, ``style``, ``tv`` (and ``temporal`` when set) and their sum ``loss``."""
        if not self.has_targets:
            raise RuntimeError("call set_targets() before computing the loss")
        with torch.autocast(image.device.type, enabled=False):
            content = sum(
                content_loss(features[layer], getattr(self, f"content_{layer}"), self.content_kind)
                for layer in self.content_layers
            ) / len(self.content_layers)
            pixels = image.shape[-2] * image.shape[-1]
            style = image.new_zeros((), dtype=torch.float32)
            for g, group_weight in enumerate(self.group_weights):
                for layer, weight in zip(self.style_layers, self.style_layer_weights):
                    feat = features[layer]
                    positions = feat.shape[-2] * feat.shape[-1]
                    gram = guided_gram(feat, getattr(self, f"mask{g}_{layer}"))
                    style = style + group_weight * weight * style_layer_loss(
                        gram, getattr(self, f"gram{g}_{layer}"), positions, pixels, self.style_kind
                    )
            terms = {
                "content": self.content_weight * content,
                "style": self.style_weight * style,
                "tv": self.smoothness(image),
            }
            terms["loss"] = terms["content"] + terms["style"] + terms["tv"]
            if self.temporal_image is not None:
                terms["temporal"] = self.temporal_weight * temporal_loss(image, self.temporal_image, self.temporal_weights)
                terms["loss"] = terms["loss"] + terms["temporal"]
        return terms
