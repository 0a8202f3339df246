"""The W2 style loss (``loss.style_loss: w2``): the squared Wasserstein-2 distance of Gaussian fits of the features.

Checked against an independent float64 eigendecomposition on random and real VGG features, by gradcheck, and on
masks, blends and folder runs through the engine.
"""

from __future__ import annotations

import pytest
import torch

from nst_lightning import fit, fit_batch, load_config
from nst_lightning.config import DEFAULT_STYLE_LAYERS, EXAMPLE_STYLE_2
from nst_lightning.images import load_image, read_image
from nst_lightning.losses import StyleTransferLoss
from nst_lightning.wasserstein import covariance, gaussian_moments, psd_sqrt, trace_sqrt, w2_layer_loss, w2_target

from .test_batch import make_frames


def reference_w2(features: torch.Tensor, style: torch.Tensor) -> float:
    """The textbook formula in float64 with ``torch.linalg.eigh`` square roots, from the raw ``(1, C, H, W)`` features."""

    def fit_gaussian(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = f[0].double().flatten(1)
        mean = x.mean(1)
        centred = x - mean[:, None]
        return mean, centred @ centred.T / x.shape[1]

    def root(a: torch.Tensor) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh(a)
        return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T

    mx, sx = fit_gaussian(features)
    ms, ss = fit_gaussian(style)
    rs = root(ss)
    w2 = (mx - ms).pow(2).sum() + torch.trace(sx + ss - 2 * root(rs @ sx @ rs))
    return float(w2) / sx.shape[0]


def package_w2(features: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    mean, moment = gaussian_moments(features)
    return w2_layer_loss(mean, covariance(mean, moment), w2_target(*gaussian_moments(style)))


@pytest.mark.parametrize(("channels", "positions"), [(6, (5, 7)), (16, (3, 4)), (32, (2, 2))], ids=["full", "rank12", "rank4"])
def test_w2_matches_a_float64_eigendecomposition_on_random_features(channels, positions):
    torch.manual_seed(0)
    f = torch.randn(1, channels, *positions).relu() * 3
    s = torch.randn(1, channels, *positions[::-1]).relu() * 2 + 0.5
    expected = reference_w2(f, s)
    assert expected > 0
    assert float(package_w2(f.double(), s.double())) == pytest.approx(expected, rel=1e-8)
    assert float(package_w2(f, s)) == pytest.approx(expected, rel=1e-4)  # fp32 features, as runs compute them


def test_w2_matches_a_float64_eigendecomposition_on_real_vgg_features(content_small, style_small, extractor):
    with torch.no_grad():
        fc, fs = extractor(content_small), extractor(style_small)
    for layer in DEFAULT_STYLE_LAYERS:  # relu4_1 and relu5_1 at 48 px: fewer positions than channels
        expected = reference_w2(fc[layer], fs[layer])
        assert float(package_w2(fc[layer], fs[layer])) == pytest.approx(expected, rel=5e-3), layer


def test_w2_of_the_style_against_itself_is_zero_and_grows_with_a_shifted_mean():
    torch.manual_seed(1)
    s = torch.randn(1, 8, 6, 6).relu()
    assert float(package_w2(s.double(), s.double())) == pytest.approx(0, abs=1e-10)
    shifted = float(package_w2(s.double() + 0.5, s.double()))
    assert shifted == pytest.approx(0.25, rel=1e-6)  # |mu - mu_s|^2 / C = 8 * 0.25 / 8, covariance unchanged


def test_psd_sqrt_squares_back_to_a_rank_deficient_covariance():
    torch.manual_seed(2)
    x = torch.randn(10, 3, dtype=torch.float64)
    cov = x @ x.T  # rank 3 of 10
    root = psd_sqrt(cov)
    torch.testing.assert_close(root @ root, cov, rtol=0, atol=1e-10)
    torch.testing.assert_close(root, root.T)


def test_w2_gradient_is_the_exact_derivative():
    torch.manual_seed(3)
    f = (torch.randn(1, 5, 4, 3, dtype=torch.float64) + 1).requires_grad_(True)
    s = torch.randn(1, 5, 5, 5, dtype=torch.float64).relu()
    assert torch.autograd.gradcheck(lambda x: package_w2(x, s), (f,))


def test_w2_gradient_descends_where_the_covariance_is_rank_deficient():
    # 4 positions, 8 channels: the root's slope is infinite at the zero eigenvalues, so no finite difference
    # agrees with any gradient there; the capped slope must still be finite and point downhill
    torch.manual_seed(3)
    f = (torch.randn(1, 8, 2, 2, dtype=torch.float64) + 1).requires_grad_(True)
    s = torch.randn(1, 8, 5, 5, dtype=torch.float64).relu()
    loss = package_w2(f, s)
    loss.backward()
    assert torch.isfinite(f.grad).all()
    with torch.no_grad():
        assert float(package_w2(f - 1e-3 * f.grad / f.grad.norm(), s)) < float(loss)


def test_w2_gradient_stays_finite_where_the_image_has_no_spread():
    flat = torch.ones(1, 16, 3, 3, requires_grad=True)  # covariance 0: every eigenvalue of the cross term is 0
    s = torch.randn(1, 16, 6, 6).relu()
    package_w2(flat, s).backward()
    assert torch.isfinite(flat.grad).all() and flat.grad.abs().sum() > 0


def test_trace_sqrt_is_the_nuclear_norm_of_the_root_factor():
    torch.manual_seed(4)
    a = torch.randn(7, 3, dtype=torch.float64)
    # tr((A A^T)^1/2) is the sum of A's singular values, also when A A^T is rank-deficient
    assert float(trace_sqrt(a @ a.T)) == pytest.approx(float(torch.linalg.svdvals(a).sum()), rel=1e-7)  # zero eigenvalues: sqrt of roundoff


def _criterion(**kwargs: object) -> StyleTransferLoss:
    return StyleTransferLoss(["relu4_2"], DEFAULT_STYLE_LAYERS, [0.2] * 5, style_loss="w2", **kwargs)


def test_bf16_features_give_the_fp32_w2_loss_in_fp32(content_small, style_small, extractor):
    with torch.no_grad():
        fc, fs = extractor(content_small), extractor(style_small)
    loss = _criterion()
    loss.set_targets(fc, [fs])
    fp32 = loss(fc, content_small)["style"]
    low = {k: v.to(torch.bfloat16) for k, v in fc.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = loss(low, content_small)["style"]
    assert bf16.dtype == torch.float32
    assert float(bf16) == pytest.approx(float(fp32), rel=0.05)  # bf16 keeps 8 bits of each feature


def test_a_blend_targets_the_gaussian_fit_of_both_styles_pooled():
    torch.manual_seed(5)
    a, b = torch.randn(1, 6, 4, 4).relu(), torch.randn(1, 6, 4, 4).relu() + 1
    pooled = torch.cat([a, b], dim=-1)  # equal weights, equal sizes: the mixture is the pooled positions
    loss = StyleTransferLoss(["relu1_1"], ["relu1_1"], [1.0], style_loss="w2")
    loss.set_targets({"relu1_1": a}, [{"relu1_1": a}, {"relu1_1": b}], blend=[2.0, 2.0])
    target = w2_target(*gaussian_moments(pooled))
    for kind in ("mean", "cov", "root"):
        torch.testing.assert_close(getattr(loss, f"{kind}0_relu1_1"), target[kind], rtol=1e-5, atol=1e-5)


def test_a_mask_fits_the_gaussian_of_the_region_it_selects():
    torch.manual_seed(6)
    f = torch.randn(1, 6, 8, 8).relu()
    left = torch.zeros(1, 1, 8, 8)
    left[..., :4] = 1
    mean, moment = gaussian_moments(f, left)
    region_mean, region_moment = gaussian_moments(f[..., :4])
    torch.testing.assert_close(mean, region_mean)
    torch.testing.assert_close(moment, region_moment)


def test_w2_targets_round_trip_through_the_target_cache(content_small, style_small, extractor):
    with torch.no_grad():
        fc, fs = extractor(content_small), extractor(style_small)
    first = _criterion()
    first.set_targets(fc, [fs])
    second = _criterion()
    second.load_targets(first.targets())
    torch.testing.assert_close(second(fc, content_small)["loss"], first(fc, content_small)["loss"])


def test_w2_runs_with_masks_and_two_blended_styles_and_lowers_its_loss(tiny_config, tmp_path):
    from PIL import Image

    left = tmp_path / "left.png"
    Image.fromarray((torch.arange(40).view(1, 40).expand(40, 40) < 20).to(torch.uint8).numpy() * 255).save(left)
    right = tmp_path / "right.png"
    Image.fromarray((torch.arange(40).view(1, 40).expand(40, 40) >= 20).to(torch.uint8).numpy() * 255).save(right)
    base = load_config(None).style
    for extra in ({"style_blend": "[0.7, 0.3]"}, {"style_masks": f"[{left}, {right}]"}):
        cfg = tiny_config(steps=4, **{"loss.style_loss": "w2", "style": f"[{base}, {EXAMPLE_STYLE_2}]", **extra},
                          output=tmp_path / ("blend" if "style_blend" in extra else "masks"))
        out = fit(cfg, progress=False)
        rows = out.losses.read_text().splitlines()[1:]
        header = out.losses.read_text().splitlines()[0].split(",")
        style = [float(r.split(",")[header.index("style")]) for r in rows]
        assert style[-1] < style[0], extra


def test_w2_folder_runs_give_each_pair_its_single_run(tmp_path):
    names = make_frames(tmp_path / "frames", 2)
    settings = [f"content={tmp_path / 'frames'}", "image.size=32", "trainer.max_steps=3", "trainer.accelerator=cpu",
                "trainer.precision=32-true", "loss.style_loss=w2"]
    report = fit_batch(load_config(None, [*settings, f"output={tmp_path / 'folder'}"]), progress=False)
    assert len(report.done) == 2
    single = fit(load_config(None, [*settings, f"content={tmp_path / 'frames' / 'frame1.png'}",
                                    f"output={tmp_path / 'single'}"]), progress=False)
    start = load_image(tmp_path / "frames" / "frame1.png", 32)
    result = read_image(tmp_path / "folder" / names[1])
    assert (result - start).abs().max() > 0.02
    assert (result - read_image(single.final)).abs().mean() < 2 / 255


# The judge's second statistic: sliced Wasserstein, which neither the Gram nor the W2 loss optimises.


def test_sliced_wasserstein_sees_a_skew_that_the_gaussian_fit_and_the_gram_miss():
    from nst_lightning.judge import _directions, sliced_wasserstein

    torch.manual_seed(7)
    s = torch.randn(1, 4, 16, 16).exp()  # skewed, sparse-ish like ReLU features
    mirrored = 2 * s.mean(dim=(-2, -1), keepdim=True) - s  # same mean and covariance, the skew reversed
    directions = _directions(4)
    assert float(package_w2(mirrored.double(), s.double())) == pytest.approx(0, abs=1e-9)
    assert sliced_wasserstein(mirrored, s, directions) > 0.1
    assert sliced_wasserstein(s, s, directions) == pytest.approx(0, abs=1e-12)


def test_sliced_wasserstein_is_free_of_scale_and_of_the_number_of_positions():
    from nst_lightning.judge import _directions, sliced_wasserstein

    torch.manual_seed(8)
    x, s = torch.randn(1, 6, 8, 8).relu(), torch.randn(1, 6, 12, 10).relu() * 2
    d = _directions(6)
    base = sliced_wasserstein(x, s, d)
    assert sliced_wasserstein(x * 100, s * 100, d) == pytest.approx(base, rel=1e-6)
    assert sliced_wasserstein(x.repeat(1, 1, 2, 3), s, d) == pytest.approx(base, rel=0.05)  # same distribution, 6x the positions


def test_the_judge_reports_both_style_statistics_and_the_style_scores_best_on_both(content_small, style_small):
    from nst_lightning.judge import Judge

    judge = Judge()
    of_style, of_content = judge(style_small, content_small, style_small), judge(content_small, content_small, style_small)
    assert of_style.style < of_content.style and of_style.style_sw < of_content.style_sw
    assert "sw" in str(of_style)


# configs/crowsonkb.yaml against the peer's formulas (crowsonkb/style-transfer-pytorch, style_transfer.py).


def _peer_w2(x: torch.Tensor, s: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """The peer's ``StyleLossW2``: mean squared mean gap plus the mean diagonal of the W2 covariance term."""

    def fit_gaussian(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = f[0].double().flatten(1)
        mean = m.mean(1)
        return mean, m @ m.T / m.shape[1] - torch.outer(mean, mean) + eps * torch.eye(m.shape[0], dtype=torch.float64)

    def root(a: torch.Tensor) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh(a)
        return vecs @ torch.diag(vals.abs().sqrt()) @ vecs.T  # the peer's sqrtm_eig

    mx, cx = fit_gaussian(x)
    ms, cs = fit_gaussian(s)
    rs = root(cs)
    return ((mx - ms) ** 2).mean() + torch.diagonal(cs + cx - 2 * root(rs @ cx @ rs)).mean()


def _peer_tv(image: torch.Tensor) -> torch.Tensor:
    """The peer's ``TVLoss`` (nine-point stencil, replicate-padded), copied."""
    x = torch.nn.functional.pad(image.double(), (1, 1, 1, 1), "replicate")
    s1, s2, s3, s4 = slice(1, -1), slice(2, None), slice(None, -1), slice(1, None)
    d1 = (x[..., s1, s2] - x[..., s1, s1]).pow(2).mean() / 3
    d2 = (x[..., s2, s1] - x[..., s1, s1]).pow(2).mean() / 3
    d3 = (x[..., s4, s4] - x[..., s3, s3]).pow(2).mean() / 12
    d4 = (x[..., s4, s3] - x[..., s3, s4]).pow(2).mean() / 12
    return 2 * (d1 + d2 + d3 + d4)


def test_crowsonkb_config_computes_the_peers_loss():
    from nst_lightning.api import build_module, load_images
    from nst_lightning.features import build_extractor

    from .conftest import CONFIGS

    cfg = load_config(CONFIGS / "crowsonkb.yaml", ["scales=[80]", "scale_steps=[1]", "trainer.precision=32-true"])
    content, styles = load_images(cfg)
    module = build_module(cfg, content, styles)
    torch.manual_seed(9)
    image = (content + 0.2 * torch.randn_like(content)).clamp(0, 1)  # away from the content, so every term counts
    with torch.no_grad():
        got = module(image)
        net = build_extractor([*DEFAULT_STYLE_LAYERS, "relu4_2"], padding="replicate")
        fx, fc, fs = net(image), net(content), net(styles[0])
    weights = [w / 341 for w in (256, 64, 16, 4, 1)]
    content_term = 0.015 * (fx["relu4_2"].double() - fc["relu4_2"].double()).pow(2).mean()
    style_term = sum(w * _peer_w2(fx[n], fs[n]) for w, n in zip(weights, DEFAULT_STYLE_LAYERS))
    assert float(got["content"]) == pytest.approx(float(content_term), rel=1e-4)
    assert float(got["style"]) == pytest.approx(float(style_term), rel=1e-3)  # the peer's 1e-4 I is all that differs
    assert float(got["smoothness"]) == pytest.approx(float(2 * _peer_tv(image)), rel=1e-5)


def test_a_cuda_graph_of_w2_steps_is_refused_by_name():
    from nst_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.cuda_graph=true cannot capture loss.style_loss=w2"):
        load_config(None, ["loss.style_loss=w2", "optim.cuda_graph=true"])
    assert load_config(None, ["loss.style_loss=w2"]).optim.cuda_graph == "auto"  # auto: w2 steps run eagerly
