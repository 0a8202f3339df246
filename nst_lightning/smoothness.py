"""Pixel smoothness terms on the ``[0, 1]`` image, in 8-bit units: total variation, colour (chroma) smoothness
and border smoothness. Plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tv_loss(image: torch.Tensor, kind: str = "keras") -> torch.Tensor:
    """Total variation of an RGB ``[0, 1]`` image measured in 8-bit pixel units (0..255).

    ``keras``: ``sum((dx^2 + dy^2)^1.25)`` as in the Keras example; ``squared``: ``sum(dx^2) + sum(dy^2)``;
    ``nine_point``: crowsonkb's L2 total variation on the ``[0, 1]`` image, means of squared differences to the
    right and below (1/3 each) and along both diagonals (1/12 each), edges replicated, times 2; a mean, so its
    weight holds at every scale.
    """
    if kind == "nine_point":
        x = F.pad(image.float(), (1, 1, 1, 1), mode="replicate")
        mid, after, head, tail = slice(1, -1), slice(2, None), slice(None, -1), slice(1, None)
        right = (x[..., mid, after] - x[..., mid, mid]).pow(2).mean() / 3
        below = (x[..., after, mid] - x[..., mid, mid]).pow(2).mean() / 3
        diagonal = (x[..., tail, tail] - x[..., head, head]).pow(2).mean() / 12
        antidiagonal = (x[..., tail, head] - x[..., head, tail]).pow(2).mean() / 12
        return 2 * (right + below + diagonal + antidiagonal)
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
