"""The W2 style loss: the squared Wasserstein-2 distance between Gaussian fits of the features (crowsonkb's),
with float64 eigen solves whose gradient stays finite for rank-deficient covariances. Plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from .gram import Features, at_least_fp32, blend_total, guided_gram


STYLE_STATISTICS = {"w2": ("mean", "cov", "root")}
"""Target tensors per style layer of the loss kinds that are not Gram distances; every other kind keeps ``gram``."""
SQRT_FLOOR = 1e-6
"""Eigenvalues below this fraction of the largest count as zero in ``trace_sqrt``'s slope (the cross term is formed in fp32, which resolves about 1e-7)."""


def gaussian_moments(features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(B, C)`` and second raw moment ``E[f f^T]`` ``(B, C, C)`` of a layer over the positions, fp32 or fp64.

    With a ``(1, 1, H, W)`` mask, positions are weighted by ``m^2`` as ``guided_gram`` does. Raw moments, unlike
    covariances, mix linearly, so blended styles combine them (the Gaussian fit of the mixture, as the peer does).
    """
    srm = guided_gram(features, mask)
    if mask is None:
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        return features.mean(dim=(-2, -1), dtype=dtype), srm
    w = mask.float().pow(2)
    return (at_least_fp32(features) * w).sum(dim=(-2, -1)) / w.sum().clamp_min(1e-8), srm


def covariance(mean: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """``E[f f^T] - mu mu^T``: the covariance from the moments ``gaussian_moments`` returns."""
    return second_moment - mean.unsqueeze(-1) * mean.unsqueeze(-2)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run LAPACK's eigenvalue solvers on one CPU thread: on a shared 2-core machine a 512-channel float64 solve took
    11.6 s with 2 OpenMP threads (each of its many small parallel regions waits for a descheduled thread) and 0.28 s
    with one."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of symmetric PSD matrices by a float64 eigendecomposition (negative roundoff to 0).

    Not differentiated: it serves the fixed targets, computed once, so exactness costs nothing per step.
    """
    with _one_cpu_thread(matrix.device):
        vals, vecs = torch.linalg.eigh(matrix.double())
    return ((vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)) @ vecs.transpose(-1, -2)).to(matrix.dtype)


class _FlooredSqrt(torch.autograd.Function):
    """``sqrt(max(x, 0))`` whose slope stops growing below ``floor``: finite gradients for zero eigenvalues."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, floor)
        return x.clamp_min(0).sqrt()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, floor = ctx.saved_tensors
        return grad / (2 * torch.maximum(x, floor).sqrt()), None


def trace_sqrt(matrix: torch.Tensor, scale: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``tr(A^1/2)`` of symmetric PSD matrices ``(..., C, C)``: the sum of the square roots of their eigenvalues.

    Stable at any rank (a covariance of fewer positions than channels, a small mask): the gradient of eigenvalues,
    ``V diag(g) V^T``, needs no gap between them, unlike that of eigenvectors or an iterative root, and the root's
    slope is capped at ``SQRT_FLOOR`` times the largest eigenvalue (or ``scale``, when larger: a zero matrix has
    no largest one) so zero ones do not blow it up. The eigenvalues are found in float64: LAPACK's fp32 solver returned NaN for a rank-4 512-channel covariance
    inside a run (not reproducibly outside it), and the float64 one costs about 15 ms more per 512-channel layer.
    """
    with _one_cpu_thread(matrix.device):
        vals = torch.linalg.eigvalsh(((matrix + matrix.transpose(-1, -2)) / 2).double())
    top = torch.maximum(vals.detach().amax(-1, keepdim=True), torch.as_tensor(scale, dtype=vals.dtype, device=vals.device))
    floor = (top * SQRT_FLOOR).clamp_min(torch.finfo(torch.float32).tiny)
    return _FlooredSqrt.apply(vals, floor.expand_as(vals)).sum(-1).to(matrix.dtype)


def w2_target(mean: torch.Tensor, second_moment: torch.Tensor) -> dict[str, torch.Tensor]:
    """A style layer's fixed W2 target: its ``mean``, ``cov`` and the covariance's square root ``root``, once."""
    cov = covariance(mean, second_moment)
    return {"mean": mean, "cov": cov, "root": psd_sqrt(cov)}


def w2_layer_loss(mean: torch.Tensor, cov: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Squared Wasserstein-2 distance of ``N(mean, cov)`` to the target Gaussian, over the channel count C.

    ``|mu - mu_s|^2 + tr(S + S_s - 2 (S_s^1/2 S S_s^1/2)^1/2)``, divided by C as crowsonkb/style-transfer-pytorch
    does (its mean over channels); summed over the batch.
    """
    root = target["root"]
    gap = (mean - target["mean"]).pow(2).sum(-1)
    target_trace = target["cov"].diagonal(dim1=-2, dim2=-1).sum(-1)
    traces = cov.diagonal(dim1=-2, dim2=-1).sum(-1) + target_trace
    scale = (target_trace.detach() / cov.shape[-1]).pow(2).unsqueeze(-1)  # the cross term's size near the target
    return (gap + traces - 2 * trace_sqrt(root @ cov @ root, scale)).sum() / cov.shape[-1]


def blend_moments(
    style_features: Sequence[Features], layers: Sequence[str], blend: Sequence[float]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer mean and second raw moment mixing several style images with ``blend`` weights (normalised to sum 1)."""
    total = blend_total(blend, len(style_features))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in layers:
        moments = [gaussian_moments(f[layer]) for f in style_features]
        out[layer] = (
            sum(m * (b / total) for (m, _), b in zip(moments, blend)),
            sum(s * (b / total) for (_, s), b in zip(moments, blend)),
        )
    return out
