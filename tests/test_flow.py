"""Optical flow, warping and reliability weights on synthetic motion whose true flow is known."""

from __future__ import annotations

import pytest
import torch

from nst_lightning.config import EXAMPLE_CONTENT
from nst_lightning.images import load_image
from nst_lightning.losses import StyleTransferLoss, TemporalTarget, temporal_loss

pytest.importorskip("cv2")

from nst_lightning.flow import FLOW_METHODS, consistency_weights, flow_and_weights, optical_flow, warp, warping_error  # noqa: E402

DX, DY = 3, 2


@pytest.fixture(scope="module")
def shifted():
    """Two 64x64 crops of a photograph, the second's content moved 3 px left and 2 px up: ``a(x) = b(x + (3, 2))``."""
    image = load_image(EXAMPLE_CONTENT, 96)
    return image[..., 10:74, 10:74], image[..., 10 - DY : 74 - DY, 10 - DX : 74 - DX]


@pytest.mark.parametrize("method", FLOW_METHODS)
def test_a_known_translation_is_recovered(shifted, method):
    a, b = shifted
    flow = optical_flow(a, b, method)
    assert flow.shape == (1, 2, 64, 64)
    inner = flow[..., 8:-8, 8:-8]
    assert inner[:, 0].median().item() == pytest.approx(DX, abs=0.15)
    assert inner[:, 1].median().item() == pytest.approx(DY, abs=0.15)
    assert (inner - torch.tensor([DX, DY]).view(1, 2, 1, 1)).abs().mean().item() < 0.3


def test_warping_by_the_flow_reproduces_the_frame(shifted):
    a, b = shifted
    exact = torch.tensor([float(DX), float(DY)]).view(1, 2, 1, 1).expand(1, 2, 64, 64)
    assert torch.allclose(warp(b, exact)[..., :-DY, :-DX], a[..., :-DY, :-DX], atol=1e-5)
    estimated, weights = flow_and_weights(a, b, "dis")
    assert warping_error(a, b, estimated, weights) < 0.01  # [0, 1] units: under 3 grey levels
    assert (a - b).abs().mean().item() > 0.1  # the frames themselves differ a lot


def test_pixels_carried_out_of_the_frame_are_flagged(shifted):
    a, b = shifted
    _, weights = flow_and_weights(a, b, "dis")
    assert weights[..., :, -DX:].max() == 0  # x + 3 leaves the frame on the right
    assert weights[..., -DY:, :].max() == 0
    assert weights[..., 8:-8, 8:-8].mean() > 0.95


def test_disoccluded_pixels_are_flagged():
    """A square moves 6 px right over a static background: what it uncovers has no source in the previous frame."""
    background = load_image(EXAMPLE_CONTENT, 64)[..., :64, :64]
    square = torch.zeros(1, 3, 20, 20)
    square[:, 0] = 1.0
    square[:, 1, ::4] = 1.0
    previous, frame = background.clone(), background.clone()
    previous[..., 22:42, 16:36] = square
    frame[..., 22:42, 22:42] = square
    weights = consistency_weights(optical_flow(frame, previous, "dis"), optical_flow(previous, frame, "dis"))
    uncovered = weights[..., 24:40, 16:22]
    assert uncovered.mean() < 0.5
    assert weights[..., 2:14, 2:62].mean() > 0.9  # static background far from the square


def test_an_identity_flow_trusts_every_pixel():
    zero = torch.zeros(1, 2, 16, 24)
    assert consistency_weights(zero, zero).min() == 1


def test_temporal_loss_counts_only_trusted_pixels():
    image, target = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    weights = torch.zeros(1, 1, 8, 8)
    assert temporal_loss(image, target, weights) == 0
    weights[..., :4, :] = 1
    expected = (image - target)[..., :4, :].pow(2).sum() / image.numel()
    assert temporal_loss(image, target, weights).item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_loss_adds_a_weighted_temporal_term_only_when_set(extractor, content_small, style_small):
    loss = StyleTransferLoss(["relu4_2"], ["relu1_1"], [1.0])
    loss.set_targets(extractor(content_small), [extractor(style_small)])
    image = content_small * 0.9
    plain = loss(extractor(image), image)
    assert "temporal" not in plain
    loss.set_temporal(TemporalTarget(content_small, torch.ones(1, 1, *content_small.shape[-2:]), 7.0))
    terms = loss(extractor(image), image)
    assert terms["temporal"].item() == pytest.approx(7.0 * temporal_loss(image, content_small, torch.ones(1)).item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(plain["loss"].item() + terms["temporal"].item(), rel=1e-5)
    loss.set_temporal(None)
    assert "temporal" not in loss(extractor(image), image)
