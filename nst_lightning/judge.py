"""One fixed quality judge for comparing style-transfer results across tools and settings.

Style distance: mean over relu1_1..relu5_1 of ``|G(x) - G(s)|_F / |G(s)|_F`` (position-normalised
Grams); a second style distance, ``style_sw``, that no loss of the package optimises: the relative sliced
Wasserstein distance of the same layers' feature distributions (a method that matches Grams, or Gaussian
fits, need not match these; a result better on both is better); content distance:
``|F(x) - F(c)|_F / |F(c)|_F`` at relu4_2. All on the caffe VGG19 (zero
padding, as trained, whatever the runs use), on
images as saved (8-bit), so what users get is what is measured. Lower is better.

Pixel cleanliness, on the same 8-bit images: ``speckle`` (colour noise) and ``border`` (strips along the edges).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .features import VGGFeatures, build_extractor
from .images import resize
from .gram import gram_matrix
from .smoothness import CHROMA

JUDGE_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
JUDGE_CONTENT_LAYER = "relu4_2"


SW_PROJECTIONS = 64
"""Random unit directions per layer of the sliced Wasserstein distance, drawn once from a fixed seed."""
SW_QUANTILES = 256
"""Quantiles compared per direction: images of any sizes give distributions of equal length."""


@dataclass(frozen=True)
class Quality:
    """Distances of a result to its style (Gram; sliced Wasserstein ``style_sw``) and content (features); lower is better."""

    style: float
    content: float
    style_sw: float = float("nan")

    def __str__(self) -> str:
        return f"style {self.style:.4f} / sw {self.style_sw:.4f} / content {self.content:.4f}"


def sliced_wasserstein(features: torch.Tensor, target: torch.Tensor, directions: torch.Tensor) -> float:
    """Relative sliced W2 of two ``(1, C, H, W)`` feature maps: ``sqrt(mean (q_x - q_s)^2 / mean q_s^2)``.

    ``q`` are the ``SW_QUANTILES`` quantiles of the features projected on each of ``directions`` ``(C, K)``;
    unlike a Gram or a Gaussian fit it compares the whole distribution along each direction (skew, sparsity).
    """
    levels = torch.linspace(0, 1, SW_QUANTILES, dtype=torch.float64)

    def quantiles(f: torch.Tensor) -> torch.Tensor:
        projected = f[0].double().flatten(1).T @ directions  # (positions, K)
        return torch.quantile(projected, levels, dim=0)

    qx, qs = quantiles(features), quantiles(target)
    return float(((qx - qs).pow(2).mean() / qs.pow(2).mean().clamp_min(1e-30)).sqrt())


def _directions(channels: int) -> torch.Tensor:
    """``SW_PROJECTIONS`` unit vectors in ``channels`` dimensions, the same on every machine (seeded, float64)."""
    d = torch.randn(channels, SW_PROJECTIONS, dtype=torch.float64, generator=torch.Generator().manual_seed(channels))
    return d / d.norm(dim=0, keepdim=True)


class Judge:
    """Scores results against a content and a style image with a fixed caffe VGG19."""

    def __init__(self, extractor: VGGFeatures | None = None) -> None:
        self.extractor = extractor or build_extractor([*JUDGE_STYLE_LAYERS, JUDGE_CONTENT_LAYER], padding="zeros")

    @torch.no_grad()
    def __call__(self, result: torch.Tensor, content: torch.Tensor, style: torch.Tensor) -> Quality:
        """Quality of ``result`` (8-bit quantised first); ``content`` is resized to the result's size."""
        x = (result.float().clamp(0, 1) * 255).round() / 255
        content = resize(content.float(), tuple(x.shape[-2:]))
        fx, fc, fs = self.extractor(x), self.extractor(content), self.extractor(style.float())
        style_d = sum(
            (torch.linalg.norm(gram_matrix(fx[n]) - gram_matrix(fs[n])) / torch.linalg.norm(gram_matrix(fs[n]))).item()
            for n in JUDGE_STYLE_LAYERS
        ) / len(JUDGE_STYLE_LAYERS)
        sw = sum(sliced_wasserstein(fx[n], fs[n], _directions(fx[n].shape[1])) for n in JUDGE_STYLE_LAYERS)
        c = JUDGE_CONTENT_LAYER
        content_d = (torch.linalg.norm(fx[c] - fc[c]) / torch.linalg.norm(fc[c])).item()
        return Quality(style=style_d, content=content_d, style_sw=sw / len(JUDGE_STYLE_LAYERS))


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """A ``(1, 3, H, W)`` or ``(3, H, W)`` image in ``[0, 1]`` as 8-bit values (float64, 0..255), ``(3, H, W)``."""
    return (image.detach().double().clamp(0, 1).reshape(-1, *image.shape[-3:])[0] * 255).round()


def speckle(image: torch.Tensor) -> float:
    """Colour speckle: mean ``|Cb - its 3x3 median| + |Cr - ...|`` over interior pixels / 2, 0..255 units.

    Cb and Cr are rounded to 8 bits as Pillow's ``YCbCr`` mode does; isolated off-colour pixels score high,
    colour edges and gradients low (a median follows them).
    """
    cbcr = torch.einsum("kc,chw->khw", torch.tensor(CHROMA, dtype=torch.float64), _pixels(image)).round()
    patches = F.unfold(cbcr.unsqueeze(1), kernel_size=3)  # (2, 9, (H-2)*(W-2))
    return float((patches[:, 4] - patches.median(dim=1).values).abs().mean())


def border(image: torch.Tensor, lines: int = 4, skip: int = 16) -> float:
    """Strips along the edges: the worst side's line-to-line jaggedness of its outer ``lines`` over the interior's.

    Per side, the profile of mean luma per pixel line (rows for top and bottom, columns for left and right) has
    roughness ``|p[i] - (p[i-1] + p[i+1]) / 2|``: its mean over the outermost lines over its median inside
    (``skip`` lines in from each side). A line averages a whole side, so texture cancels out and what runs along
    the edge stays: 1-2 px strips and the row-parity ripple VGG's zero padding leaves. A photograph scores about
    1 or less (the bundled astronaut at 256 px: 0.72), where an outer-over-next-lines luma ratio calls a
    photograph's own bright margin a strip (the astronaut's: 1.066).
    """
    y = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64) @ _pixels(image).flatten(1)
    y = y.reshape(image.shape[-2:])
    figures = []
    for profile in (y.mean(1), y.mean(0)):
        rough = (profile[1:-1] - (profile[:-2] + profile[2:]) / 2).abs()
        reference = max(float(rough[skip:-skip].median()), 1e-6)
        figures += [float(rough[:lines].mean()) / reference, float(rough[-lines:].mean()) / reference]
    return max(figures)
