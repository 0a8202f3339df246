"""One fixed quality judge for comparing style-transfer results across tools and settings.

Style distance: mean over relu1_1..relu5_1 of ``|G(x) - G(s)|_F / |G(s)|_F`` (position-normalised
Grams); content distance: ``|F(x) - F(c)|_F / |F(c)|_F`` at relu4_2. Both on the caffe VGG19 (zero
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
from .losses import CHROMA, gram_matrix

JUDGE_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
JUDGE_CONTENT_LAYER = "relu4_2"


@dataclass(frozen=True)
class Quality:
    """Distances of a result to its style (Gram) and content (features); lower is better."""

    style: float
    content: float


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
        c = JUDGE_CONTENT_LAYER
        content_d = (torch.linalg.norm(fx[c] - fc[c]) / torch.linalg.norm(fc[c])).item()
        return Quality(style=style_d, content=content_d)


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
