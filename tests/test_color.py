"""Colour control: the colour maths, and the effect of each mode on a real (tiny) run."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from nst_lightning.color import luminance, matched_colors, matched_luminance, rgb_to_yiq, with_chroma, yiq_to_rgb
from nst_lightning.module import StyleTransferModule


def test_yiq_round_trips_and_grey_has_no_chroma():
    x = torch.rand(1, 3, 5, 7)
    torch.testing.assert_close(yiq_to_rgb(rgb_to_yiq(x)), x, atol=1e-5, rtol=0)
    grey = luminance(x)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    assert rgb_to_yiq(grey)[:, 1:].abs().max() < 1e-5


def test_with_chroma_takes_luminance_from_one_image_and_chroma_from_the_other():
    x, c = torch.rand(1, 3, 6, 6) * 0.4 + 0.3, torch.rand(1, 3, 6, 6) * 0.4 + 0.3
    out = rgb_to_yiq(with_chroma(x, c))
    torch.testing.assert_close(out[:, :1], rgb_to_yiq(x)[:, :1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 1:], rgb_to_yiq(c)[:, 1:], atol=1e-5, rtol=0)


def _stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = t[0].reshape(3, -1)
    return flat.mean(1), torch.cov(flat)


def test_histogram_matching_gives_the_style_the_contents_colour_mean_and_covariance():
    gen = torch.Generator().manual_seed(0)
    style = 0.5 + 0.08 * torch.randn(1, 3, 24, 24, generator=gen)
    style[:, 2] = 0.6 * style[:, 0] + 0.2 + 0.03 * torch.randn(1, 24, 24, generator=gen)  # correlated channels
    content = 0.45 + 0.05 * torch.randn(1, 3, 24, 24, generator=gen)
    content[:, 0] += 0.1
    mean, cov = _stats(matched_colors(style, content))
    want_mean, want_cov = _stats(content)
    torch.testing.assert_close(mean, want_mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(cov, want_cov, atol=5e-5, rtol=0)


def test_histogram_matching_moves_a_real_paintings_colours_towards_the_photo(content_small, style_small):
    _, cov_c = _stats(content_small)
    mean, cov = _stats(matched_colors(style_small, content_small))
    mean_s, cov_s = _stats(style_small)
    mean_c = _stats(content_small)[0]
    assert (mean - mean_c).abs().max() < 0.3 * (mean_s - mean_c).abs().max()
    assert torch.linalg.norm(cov - cov_c) < 0.5 * torch.linalg.norm(cov_s - cov_c)


def test_matched_luminance_has_the_contents_brightness_and_spread(content_small, style_small):
    y = rgb_to_yiq(matched_luminance(style_small, content_small))[:, 0]
    yc = rgb_to_yiq(content_small)[:, 0]
    assert y.mean().item() == pytest.approx(yc.mean().item(), abs=0.01)
    assert y.std().item() == pytest.approx(yc.std().item(), abs=0.02)


@pytest.fixture(scope="module")
def stylised(content_small, style_small, _pristine_extractor):
    """The result of a short run in each colour mode, each on its own copy of the network."""

    def run(mode: str) -> torch.Tensor:
        extractor = copy.deepcopy(_pristine_extractor)
        module = StyleTransferModule(content_small, style_small, extractor=extractor, color=mode)
        L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(module)
        return module.result()

    return {mode: run(mode) for mode in ("none", "luminance", "histogram")}


def _chroma_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (rgb_to_yiq(x)[:, 1:] - rgb_to_yiq(ref)[:, 1:]).abs().mean().item()


def test_luminance_mode_keeps_the_contents_chroma_and_still_stylises(stylised, content_small):
    assert _chroma_error(stylised["luminance"], content_small) < 0.005
    assert _chroma_error(stylised["none"], content_small) > 0.03
    luma_change = (rgb_to_yiq(stylised["luminance"])[:, 0] - rgb_to_yiq(content_small)[:, 0]).abs().mean()
    assert luma_change > 0.03


def test_histogram_mode_keeps_the_contents_palette_closer_than_the_default(stylised, content_small):
    mean = lambda t: t.mean((0, 2, 3))  # noqa: E731
    default_shift = (mean(stylised["none"]) - mean(content_small)).abs().sum()
    histogram_shift = (mean(stylised["histogram"]) - mean(content_small)).abs().sum()
    assert histogram_shift < 0.5 * default_shift
