"""Loss maths: Gram matrices, the paper's normalisations, the Keras TV, fp32 under autocast."""

from __future__ import annotations

import pytest
import torch

from nst_lightning.gram import blend_grams, gram_matrix
from nst_lightning.losses import StyleTransferLoss, content_loss, style_layer_loss
from nst_lightning.smoothness import border_tv_loss, chroma_tv_loss, tv_loss


def test_gram_is_feature_correlation_over_positions():
    f = torch.randn(1, 4, 3, 5)
    flat = f.reshape(4, 15)
    torch.testing.assert_close(gram_matrix(f)[0], flat @ flat.T / 15)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gram_gradient_is_the_exact_derivative_in_either_layout(layout):
    f = torch.randn(2, 5, 4, 3, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(True)
    assert torch.autograd.gradcheck(gram_matrix, (f,))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gram_of_bf16_features_is_the_fp32_gram_of_their_values(layout):
    f = torch.randn(1, 8, 80, 90).to(torch.bfloat16).contiguous(memory_format=layout)  # more positions than one chunk
    gram = gram_matrix(f)
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram, gram_matrix(f.float()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_on_cuda_a_bf16_gram_is_one_fp32_accumulating_bmm(monkeypatch, layout):
    # no CUDA here: the meta device has the same op (aten::bmm.dtype) and checks the call's shapes and dtypes;
    # the values on CUDA are checked in test_cuda.py, the CPU keeps the chunked path tested above
    from nst_lightning import gram as losses

    assert losses.FP32_OUTPUT_BMM_DEVICES == ("cuda",)
    calls = []
    monkeypatch.setattr(losses, "FP32_OUTPUT_BMM_DEVICES", ("cuda", "meta"))
    monkeypatch.setattr(torch.Tensor, "baddbmm_", lambda *a, **k: calls.append(a))
    f = torch.empty(2, 8, 80, 90, dtype=torch.bfloat16, device="meta").contiguous(memory_format=layout)
    gram = losses._Gram._gram(f)  # the forward inside gram_matrix (whose autocast guard knows no meta device)
    assert gram.dtype == torch.float32 and gram.shape == (2, 8, 8) and calls == []


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gram_gradient_of_bf16_features_is_bf16_at_bf16_accuracy(layout):
    f = torch.randn(1, 16, 20, 30).to(torch.bfloat16).contiguous(memory_format=layout).requires_grad_(True)
    weights = torch.randn(1, 16, 16)
    (gram_matrix(f) * weights).sum().backward()
    exact = f.detach().double().requires_grad_(True)
    (gram_matrix(exact) * weights.double()).sum().backward()
    assert f.grad.dtype == torch.bfloat16 and f.grad.shape == f.shape
    assert (f.grad.double() - exact.grad).norm() / exact.grad.norm() < 1e-2


def test_paper_style_loss_equals_the_published_formula_on_unnormalised_grams():
    f, s = torch.randn(1, 8, 6, 7), torch.randn(1, 8, 6, 7)
    n, m = 8, 42
    g, a = f.reshape(n, m) @ f.reshape(n, m).T, s.reshape(n, m) @ s.reshape(n, m).T
    paper = ((g - a) ** 2).sum() / (4 * n**2 * m**2)
    ours = style_layer_loss(gram_matrix(f), gram_matrix(s), m, 99, "paper")
    torch.testing.assert_close(ours, paper)


def test_keras_style_loss_uses_three_channels_and_image_pixels():
    f, s = torch.randn(1, 8, 6, 7), torch.randn(1, 8, 6, 7)
    m, pixels = 42, 24 * 28
    g, a = f.reshape(8, m) @ f.reshape(8, m).T, s.reshape(8, m) @ s.reshape(8, m).T
    keras = ((g - a) ** 2).sum() / (4.0 * 9 * pixels**2)
    torch.testing.assert_close(style_layer_loss(gram_matrix(f), gram_matrix(s), m, pixels, "keras"), keras)


def test_content_loss_kinds():
    x, t = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    assert content_loss(x, t, "mse").item() == pytest.approx(2.5)
    assert content_loss(x, t, "paper").item() == pytest.approx(2.5)
    assert content_loss(x, t, "sum").item() == pytest.approx(5.0)


def test_tv_is_measured_in_8bit_pixel_units():
    img = torch.zeros(1, 3, 3, 3)
    img[..., 1, 1] = 1.0
    dx_dy = 255.0**2
    # keras form: over the top-left 2x2 block, (dx^2 + dy^2)^1.25
    expected_keras = 3 * ((2 * dx_dy) ** 1.25 + 2 * dx_dy**1.25)
    assert tv_loss(img, "keras").item() == pytest.approx(expected_keras, rel=1e-5)
    assert tv_loss(img, "squared").item() == pytest.approx(3 * 4 * dx_dy, rel=1e-5)
    assert tv_loss(torch.full((1, 3, 4, 4), 0.3), "keras").item() == 0


def test_chroma_smoothness_is_the_mean_squared_cbcr_difference_of_neighbours_in_8bit_units():
    img = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    r, g, b = (img[:, c] * 255 for c in range(3))
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b  # JPEG's full-range Cb and Cr (Pillow's YCbCr), offsets dropped
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    vertical = [(c[:, 1:, :] - c[:, :-1, :]) ** 2 for c in (cb, cr)]
    horizontal = [(c[:, :, 1:] - c[:, :, :-1]) ** 2 for c in (cb, cr)]
    expected = ((vertical[0] + vertical[1]).sum((1, 2)) + (horizontal[0] + horizontal[1]).sum((1, 2))) / (4 * 7 + 5 * 6)
    torch.testing.assert_close(chroma_tv_loss(img), expected.float(), rtol=1e-5, atol=0)


def test_chroma_smoothness_leaves_luminance_free():
    img = torch.rand(1, 3, 16, 16) * 0.5
    grey_detail = torch.rand(1, 1, 16, 16) * 0.5  # the same change to R, G and B at each pixel: luma only
    assert chroma_tv_loss(grey_detail.expand(1, 3, 16, 16)).item() < 1e-6
    assert chroma_tv_loss(img + grey_detail).item() == pytest.approx(chroma_tv_loss(img).item(), rel=1e-4)
    assert chroma_tv_loss(img).item() > 10


def test_border_smoothness_is_the_tapered_mean_squared_difference_across_each_sides_outer_lines():
    img = torch.rand(2, 3, 20, 18, dtype=torch.float64)
    x = img * 255
    weights = [(8 - k) / 8 for k in range(8)]  # pair k lies between lines k and k+1 from the edge

    def side(line):  # line(i): the i-th pixel line in from this side, (B, 3, length)
        return sum(w * ((line(k + 1) - line(k)) ** 2) for k, w in enumerate(weights)).mean((1, 2)) / 8

    expected = (
        side(lambda i: x[:, :, i, :]) + side(lambda i: x[:, :, -1 - i, :])
        + side(lambda i: x[:, :, :, i]) + side(lambda i: x[:, :, :, -1 - i])
    ) / 4
    torch.testing.assert_close(border_tv_loss(img), expected.float(), rtol=1e-5, atol=0)


def test_border_smoothness_leaves_texture_along_the_edges_and_the_interior_free():
    img = torch.rand(1, 3, 40, 40)
    img[..., :10, :] = img[..., :1, :]  # the outer lines: texture along the edge, the same on every line
    img[..., -10:, :] = img[..., -1:, :]
    img[..., :, :10] = img[..., :, :1]
    img[..., :, -10:] = img[..., :, -1:]
    assert border_tv_loss(img).item() < 1e-6
    img[..., -2, :] += 0.1  # a strip one line in from the bottom: pairs 0 (weight 1) and 1 (7/8) see it
    assert border_tv_loss(img).item() == pytest.approx(25.5**2 * (1 + 7 / 8) / 8 / 4, rel=1e-4)


def test_blended_target_gives_the_same_gradient_as_the_blended_losses():
    feats = [torch.randn(1, 4, 5, 5) for _ in range(2)]
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    blend = [0.7, 0.3]
    target = blend_grams([{"l": f} for f in feats], ["l"], blend)["l"]
    (g1,) = torch.autograd.grad(((gram_matrix(x) - target) ** 2).sum(), x)
    separate = sum(b * ((gram_matrix(x) - gram_matrix(f)) ** 2).sum() for b, f in zip(blend, feats))
    (g2,) = torch.autograd.grad(separate, x)
    torch.testing.assert_close(g1, g2)


def _criterion(**kw):
    return StyleTransferLoss(["relu4_2"], ["relu1_1", "relu2_1"], [0.5, 0.5], **kw)


def test_criterion_needs_targets(extractor, content_small):
    with pytest.raises(RuntimeError, match="set_targets"):
        _criterion()(extractor(content_small), content_small)


def test_criterion_terms_are_weighted_and_sum_to_the_total(extractor, content_small, style_small):
    crit = _criterion(content_weight=2.0, style_weight=3.0, tv_weight=1e-6)
    crit.set_targets(extractor(content_small), [extractor(style_small)])
    terms = crit(extractor(content_small), content_small)
    assert terms["content"].item() == 0
    assert terms["style"].item() > 0 and terms["smoothness"].item() > 0
    torch.testing.assert_close(terms["loss"], terms["content"] + terms["style"] + terms["smoothness"])
    assert {k: v.dtype for k, v in terms.items()} == dict.fromkeys(terms, torch.float32)


def test_tv_term_adds_weighted_total_variation_chroma_and_border_smoothness(extractor, content_small, style_small):
    crit = _criterion(tv_weight=1e-7, chroma_weight=0.01, border_weight=0.002)
    crit.set_targets(extractor(content_small), [extractor(style_small)])
    image = (content_small + 0.1 * torch.randn_like(content_small)).clamp(0, 1)
    terms = crit(extractor(image), image)
    expected = 1e-7 * tv_loss(image) + 0.01 * chroma_tv_loss(image).sum() + 0.002 * border_tv_loss(image).sum()
    torch.testing.assert_close(terms["smoothness"], expected)
    assert _criterion(chroma_weight=0.0, border_weight=0.0).smoothness(image).item() == 0


def test_grams_and_losses_stay_fp32_under_bf16_autocast(extractor, content_small, style_small):
    crit = _criterion()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        crit.set_targets(extractor(content_small), [extractor(style_small)])
        feats = extractor(content_small)
        terms = crit(feats, content_small)
    assert feats["relu1_1"].dtype == torch.bfloat16
    assert crit.gram0_relu1_1.dtype == torch.float32
    assert terms["loss"].dtype == torch.float32
    ref = _criterion()
    ref.set_targets(extractor(content_small), [extractor(style_small)])
    exact = ref(extractor(content_small), content_small)["style"]
    assert terms["style"].item() == pytest.approx(exact.item(), rel=0.05)


def test_relative_content_loss_is_the_squared_error_over_the_targets_squared_norm():
    f, c = torch.randn(1, 8, 6, 7), torch.randn(1, 8, 6, 7)
    expected = ((f - c) ** 2).sum() / (c**2).sum()
    torch.testing.assert_close(content_loss(f, c, "relative"), expected)
    torch.testing.assert_close(content_loss(3 * f, 3 * c, "relative"), expected)  # scale-free


def test_relative_style_loss_is_the_squared_relative_error_of_position_normalised_grams():
    f, s = torch.randn(1, 8, 6, 7), torch.randn(1, 8, 9, 5)  # output and style of different sizes
    g = f.reshape(8, 42) @ f.reshape(8, 42).T / 42
    a = s.reshape(8, 45) @ s.reshape(8, 45).T / 45
    expected = ((g - a) ** 2).sum() / (a**2).sum()
    torch.testing.assert_close(style_layer_loss(gram_matrix(f), gram_matrix(s), 42, 99, "relative"), expected)


def test_default_criterion_is_the_weighted_sum_of_the_relative_formulas(extractor, content_small, style_small):
    image = (content_small + 0.1 * torch.randn_like(content_small)).clamp(0, 1)
    crit = _criterion(content_weight=2.0, style_weight=3.0, content_loss="relative", style_loss="relative")
    crit.set_targets(extractor(content_small), [extractor(style_small)])
    terms = crit(extractor(image), image)

    def gram(x: torch.Tensor) -> torch.Tensor:
        m = x.reshape(x.shape[1], -1).double()
        return m @ m.T / m.shape[1]

    out, c, s = extractor(image), extractor(content_small), extractor(style_small)
    content = ((out["relu4_2"].double() - c["relu4_2"].double()) ** 2).sum() / (c["relu4_2"].double() ** 2).sum()
    style = sum(
        0.5 * ((gram(out[n]) - gram(s[n])) ** 2).sum() / (gram(s[n]) ** 2).sum() for n in ("relu1_1", "relu2_1")
    )
    assert terms["content"].item() == pytest.approx(2.0 * content.item(), rel=1e-4)
    assert terms["style"].item() == pytest.approx(3.0 * style.item(), rel=1e-4)
    assert terms["content"].item() > 0 and terms["style"].item() > 0


def test_the_loss_built_without_settings_weighs_its_terms_as_the_config_does():
    import inspect

    from nst_lightning.config import LossConfig

    config = LossConfig()
    defaults = {
        name: p.default
        for name, p in inspect.signature(StyleTransferLoss).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    wanted = {name: getattr(config, name) for name in defaults}
    assert defaults == wanted
    assert {"chroma_weight", "border_weight", "content_weight", "style_weight", "tv_weight"} <= set(defaults)
