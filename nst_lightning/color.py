"""Colour control (Gatys et al. 2017, "Controlling Perceptual Factors in Neural Style Transfer", §5).

``luminance``: transfer style on luminance images only, then give the result the content's chroma
(YIQ). ``histogram``: recolour each style image so its mean and colour covariance match the content's
before transfer. Plain PyTorch on ``(1, 3, H, W)`` RGB images in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COLOR_MODES = ("none", "luminance", "histogram")

_RGB_TO_YIQ = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [0.595716, -0.274453, -0.321263],
        [0.211456, -0.522591, 0.311135],
    ]
)


def _apply(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", matrix.to(image), image)


def rgb_to_yiq(image: torch.Tensor) -> torch.Tensor:
    """RGB to YIQ (NTSC): Y is luminance, I and Q the chroma."""
    return _apply(_RGB_TO_YIQ, image)


def yiq_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """YIQ back to RGB (not clamped)."""
    return _apply(torch.linalg.inv(_RGB_TO_YIQ.double()).float(), image)


def luminance(image: torch.Tensor) -> torch.Tensor:
    """The image's luminance as a grey RGB image (Y in all three channels), so VGG can take it."""
    return rgb_to_yiq(image)[:, :1].expand(-1, 3, -1, -1).contiguous()


def matched_luminance(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The style's luminance shifted and scaled to the content's mean and spread, as a grey image.

    Gatys et al. match the luminance histograms this way so the style's brightness does not overrule
    the content's.
    """
    ys, yc = rgb_to_yiq(style)[:, :1], rgb_to_yiq(content)[:, :1]
    y = (ys - ys.mean()) * (yc.std() / ys.std().clamp_min(1e-6)) + yc.mean()
    return y.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def with_chroma(image: torch.Tensor, chroma_source: torch.Tensor) -> torch.Tensor:
    """``image``'s luminance combined with ``chroma_source``'s I and Q channels, back in RGB ``[0, 1]``."""
    yiq = rgb_to_yiq(chroma_source).clone()
    yiq[:, :1] = rgb_to_yiq(image)[:, :1]
    return yiq_to_rgb(yiq).clamp(0.0, 1.0)


def _sqrtm(cov: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(cov)
    values = values.clamp_min(1e-8)
    power = -0.5 if inverse else 0.5
    return vectors @ torch.diag(values**power) @ vectors.T


def matched_colors(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The style recoloured by the affine map that gives its pixels the content's mean and covariance.

    Gatys et al.'s colour histogram matching: ``x' = A (x - mu_s) + mu_c`` with
    ``A = Sigma_c^(1/2) Sigma_s^(-1/2)`` (the Image Analogies variant), per RGB pixel.
    """
    s = style[0].reshape(3, -1).double()
    c = content[0].reshape(3, -1).double()
    mu_s, mu_c = s.mean(1, keepdim=True), c.mean(1, keepdim=True)
    eye = 1e-5 * torch.eye(3, dtype=torch.float64, device=style.device)
    cov_s = torch.cov(s) + eye
    cov_c = torch.cov(c) + eye
    a = _sqrtm(cov_c) @ _sqrtm(cov_s, inverse=True)
    out = a @ (s - mu_s) + mu_c
    return out.reshape(style.shape).to(style.dtype).clamp(0.0, 1.0)


def prepare(mode: str, content: torch.Tensor, styles: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The content and style images the optimisation sees under colour ``mode``."""
    if mode == "none":
        return content, list(styles)
    if mode == "luminance":
        return luminance(content), [matched_luminance(s, content) for s in styles]
    if mode == "histogram":
        return content, [matched_colors(s, content) for s in styles]
    raise ValueError(f"unknown colour mode {mode!r}; use one of {', '.join(COLOR_MODES)}")
