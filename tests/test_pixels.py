"""Pixel cleanliness: the speckle and border figures measure what they say, and the default output is free of
the colour speckle and edge strips the plain losses leave."""

from __future__ import annotations

import torch

from nst_lightning.api import fit
from nst_lightning.config import EXAMPLE_CONTENT, load_config
from nst_lightning.images import load_image, read_image
from nst_lightning.judge import border, speckle

from .conftest import tiny_overrides


def test_speckle_counts_isolated_off_colour_pixels_not_grey_detail_or_colour_edges():
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert speckle(flat) == 0
    grey_noise = torch.rand(1, 1, 32, 32).expand(1, 3, 32, 32)  # luminance detail only
    assert speckle(grey_noise) == 0
    edge = flat.clone()
    edge[..., :, 16:] = torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1)  # one sharp colour edge
    assert speckle(edge) == 0
    dotted = flat.clone()
    dotted[0, :, 8, 8] = torch.tensor([1.0, 0.0, 1.0])  # one magenta pixel: Cb and Cr off by ~84 and ~106
    # the dot differs from its own median once (at its own position; its neighbours' medians ignore it)
    assert abs(speckle(dotted) - (84 + 107) / 2 / 30**2) < 0.5


def test_border_is_about_one_for_a_photograph_and_high_for_a_one_pixel_strip():
    photo = load_image(EXAMPLE_CONTENT, 96)
    assert border(photo) < 1.5
    strip = photo.clone()
    strip[..., -2, :] = (strip[..., -2, :] + 0.2).clamp(0, 1)  # a bright line one pixel in from the bottom
    assert border(strip) > 5


def test_the_default_output_has_far_less_colour_speckle_and_edge_strips_than_the_plain_losses(tmp_path):
    figures = {}
    for name, extra in [("default", {}), ("plain", {"loss.chroma_weight": 0, "loss.border_weight": 0})]:
        cfg = load_config(None, tiny_overrides(tmp_path / name, steps=30, **{"image.size": 64, **extra}))
        result = read_image(fit(cfg, progress=False).final)
        figures[name] = speckle(result), border(result)
    (speckle_default, border_default), (speckle_plain, border_plain) = figures["default"], figures["plain"]
    assert speckle_default < 0.5 * speckle_plain, figures
    assert border_default < 0.7 * border_plain, figures
    assert border_default <= border(load_image(EXAMPLE_CONTENT, 64)), figures  # edges as clean as the photograph's
