"""One fixed quality judge for comparing style-transfer results across tools and settings.

Style distance: mean over relu1_1..relu5_1 of ``|G(x) - G(s)|_F / |G(s)|_F`` (position-normalised
Grams); content distance: ``|F(x) - F(c)|_F / |F(c)|_F`` at relu4_2. Both on the caffe VGG19 (zero
padding, as trained, whatever the runs use), on
images as saved (8-bit), so what users get is what is measured. Lower is better.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .features import VGGFeatures, build_extractor
from .images import resize
from .losses import gram_matrix

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
