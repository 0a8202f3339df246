"""Gram matrices in fp32 from features of any dtype and layout (the style statistic of Gatys et al.), guided by
masks where a style applies to a region. Plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

Features = Mapping[str, torch.Tensor]
"""A network's activations by layer name."""


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """``F F^T / M`` per image: ``(B, C, H, W) -> (B, C, C)`` in fp32 (fp64 stays fp64), M = H*W positions.

    Dividing by M lets a style image of any size be compared with the output; for equal sizes the
    style loss below equals the paper's ``1/(4 N^2 M^2) sum (G - A)^2`` on unnormalised Grams.
    """
    return _Gram.apply(features)


def at_least_fp32(features: torch.Tensor) -> torch.Tensor:
    """The features themselves if fp32 or fp64, else an fp32 copy: statistics are never accumulated in bf16."""
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
            x = at_least_fp32(x)
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
    weighted = at_least_fp32(features) * mask.float()
    return gram_matrix(weighted) * (h * w) / mask.float().pow(2).sum().clamp_min(1e-8)


def layer_mask(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A ``(1, 1, H, W)`` mask in ``[0, 1]`` averaged down to a layer's ``(h, w)`` grid."""
    return F.interpolate(mask.float(), size=tuple(shape), mode="area").clamp(0.0, 1.0)


def blend_total(blend: Sequence[float], styles: int) -> float:
    """The sum of the style blend weights, checked: one weight per style image, summing to more than 0."""
    if len(blend) != styles:
        raise ValueError(f"{len(blend)} blend weights for {styles} style images")
    total = float(sum(blend))
    if total <= 0:
        raise ValueError("style blend weights must sum to more than 0")
    return total


def blend_grams(style_features: Sequence[Features], layers: Sequence[str], blend: Sequence[float]) -> dict[str, torch.Tensor]:
    """Per-layer Gram target mixing several style images with ``blend`` weights (normalised to sum 1).

    ``sum_s b_s |G - A_s|^2`` and ``|G - sum_s b_s A_s|^2`` differ by a constant, so one blended target
    gives the same gradients at a fraction of the cost.
    """
    total = blend_total(blend, len(style_features))
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        out[layer] = sum(gram_matrix(f[layer]) * (b / total) for f, b in zip(style_features, blend))
    return out
