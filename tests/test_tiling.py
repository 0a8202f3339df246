"""Tiled evaluation is exact: the same loss and gradient as the whole image, with tiles far smaller than it.

Agreement is judged in fp32 with tolerances (tiles sum positions in another order): the loss within 1e-5
relative, the gradient within 1e-4 of its norm. Shallow layers keep the halo small, so the tiles' inputs
really are cut out of the image; the halo to relu5_1 is checked on a long, narrow image.
"""

from __future__ import annotations

import pytest
import torch

from nst_lightning import tiling
from nst_lightning.config import EXAMPLE_CONTENT, EXAMPLE_STYLE, EXAMPLE_STYLE_2
from nst_lightning.images import load_image
from nst_lightning.layers import LAYER_NAMES, aligned_tile, alignment, halo, layer_shape, receptive_radius, stride
from nst_lightning.module import StyleTransferModule
from nst_lightning.tiling import tile_grid, tiled_features

SHALLOW = {"style_layers": ["relu1_1", "relu2_1", "relu3_1"], "content_layers": ["relu3_1"]}
"""Layers whose halo (16 px) is smaller than the tiles, so every tile's input is a real cut out of the image."""
LOCAL_TERMS = {"tv_weight": 1e-6, "chroma_weight": 0.05, "border_weight": 0.05}


@pytest.fixture(scope="module")
def content():
    return load_image(EXAMPLE_CONTENT, 224)[..., :160, :224].contiguous()


@pytest.fixture(scope="module")
def styles():
    return [load_image(EXAMPLE_STYLE, 96), load_image(EXAMPLE_STYLE_2, 80)]


def _agreement(module: StyleTransferModule, tile: int) -> tuple[float, float]:
    """Relative loss error and gradient error over the gradient's norm, tiled against untiled, at the module's image."""
    module.prepare_targets()
    x = (module.image.detach() / module.pixel_scale).requires_grad_(True)
    whole = module.loss_terms(x)
    whole["loss"].sum().backward()
    terms, grad = tiling.tiled_terms(module.network, module.criteria, x.detach(), tile, module.with_margin)
    for name in ("content", "style", "smoothness"):
        assert torch.allclose(terms[name], whole[name].detach(), rtol=1e-5, atol=0), name
    loss_error = ((terms["loss"] - whole["loss"].detach()).abs() / whole["loss"].detach().abs()).max().item()
    return loss_error, ((grad - x.grad).norm() / x.grad.norm()).item()


def test_the_grid_covers_the_image_once_with_aligned_interiors_and_a_halo_past_the_receptive_field():
    layers = ["relu1_1", "relu5_1"]
    step = alignment(layers)
    assert step == 16 and halo(layers) % step == 0 and halo(layers) >= receptive_radius("relu5_1")
    assert receptive_radius("relu3_1") < receptive_radius("relu4_1") < receptive_radius("relu5_1")
    grid = tile_grid(157, 211, 40, layers)
    side = aligned_tile(40, layers)
    covered = torch.zeros(157, 211, dtype=torch.int32)
    for t in grid:
        covered[t.y0 : t.y1, t.x0 : t.x1] += 1
        assert t.y0 % side == 0 and t.x0 % side == 0 and t.iy0 % step == 0 and t.ix0 % step == 0
        assert t.iy0 == max(0, t.y0 - halo(layers)) and t.iy1 == min(157, t.y1 + halo(layers))
    assert bool((covered == 1).all())


def test_tile_interiors_reproduce_the_whole_images_features_to_relu5_1_and_a_smaller_halo_would_not(extractor, monkeypatch):
    image = load_image(EXAMPLE_CONTENT, 400)[..., :48, :400].contiguous()
    layers = ["relu1_1", "relu2_1", "relu3_1", "relu4_2", "relu5_1"]
    whole = extractor(image)
    tiled = tiled_features(extractor, image, layers, 48)
    assert len(tile_grid(48, 400, 48, layers)) == 9 and 48 + 2 * halo(layers) < 400
    for layer in layers:
        scale = whole[layer].abs().max()
        assert torch.allclose(tiled[layer], whole[layer], atol=1e-5 * scale, rtol=0), layer
    monkeypatch.setattr(tiling, "halo", lambda layers, full=halo(layers): full - alignment(layers))  # one grid step short
    short = tiled_features(extractor, image, layers, 48)
    assert not torch.allclose(short["relu5_1"], whole["relu5_1"], atol=1e-5 * whole["relu5_1"].abs().max(), rtol=0)


@pytest.mark.parametrize(
    "style_loss, content_loss", [("relative", "relative"), ("paper", "paper"), ("keras", "sum"), ("mean_chw", "mse")]
)
def test_tiled_loss_and_gradient_agree_with_the_whole_image_for_every_loss_kind(
    content, styles, extractor, style_loss, content_loss
):
    loss = {**SHALLOW, **LOCAL_TERMS, "style_loss": style_loss, "content_loss": content_loss}
    module = StyleTransferModule(content, styles[0], loss=loss, features={"margin": 4}, init="noise", extractor=extractor)
    loss_error, grad_error = _agreement(module, 48)
    assert loss_error < 1e-5 and grad_error < 1e-4


def test_tiled_evaluation_agrees_with_masks_a_blend_luminance_and_an_odd_size(content, styles, extractor):
    odd = content[..., :157, :211].contiguous()
    left = torch.zeros(1, 1, 157, 211)
    left[..., :, :100] = 1.0
    module = StyleTransferModule(
        odd, styles, loss={**SHALLOW, **LOCAL_TERMS}, init="noise", extractor=extractor, color="luminance",
        style_blend=[2.0, 1.0], style_masks=[left, 1.0 - left],
    )
    loss_error, grad_error = _agreement(module, 40)
    assert loss_error < 1e-5 and grad_error < 1e-4


def test_tiled_targets_equal_the_whole_images(content, styles, extractor):
    loss = {**SHALLOW, "content_layers": ["relu3_1", "relu2_1"]}
    whole = StyleTransferModule(content, styles, loss=loss, style_blend=[1.0, 3.0], extractor=extractor)
    tiled = StyleTransferModule(content, styles, loss=loss, style_blend=[1.0, 3.0], extractor=extractor, features={"tile": 48})
    whole.prepare_targets()
    tiled.prepare_targets()
    expected, got = whole.criteria[0].targets(), tiled.criteria[0].targets()
    assert expected.keys() == got.keys() and got["group_weights"] == expected["group_weights"]
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(got[name], value, rtol=1e-5, atol=1e-6 * value.abs().max()), name


FOLLOWING = [
    # (optimiser, largest mean and max pixel difference after 20 steps, 0..1 units)
    ({"name": "lbfgs", "precondition_levels": 0}, 1e-3, 2e-2),
    # the default, preconditioned L-BFGS takes larger steps, so the tiles' other summation order grows further
    # (measured 0.0019-0.0025 mean, 0.017-0.031 max on 1 and 2 threads) while the losses agree as closely
    ({"name": "lbfgs"}, 6e-3, 8e-2),
    ({"name": "adam", "average": 0.9, "lr": 2.0}, 1e-3, 2e-2),
]


@pytest.mark.parametrize(("optim", "mean", "most"), FOLLOWING, ids=["lbfgs-plain", "lbfgs-preconditioned", "adam-average"])
def test_a_tiled_run_follows_the_untiled_one_over_20_steps(content, styles, extractor, optim, mean, most):
    import lightning as L

    small = content[..., :64, :96].contiguous()
    loss = {**SHALLOW, "tv_weight": 1e-6}
    results = []
    for tile in ("off", 32):
        module = StyleTransferModule(small, styles[0], loss=loss, optim=optim, features={"tile": tile}, extractor=extractor)
        trainer = L.Trainer(
            max_steps=20, accelerator="cpu", precision="32-true", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(module)
        results.append((module.result(), module.loss_terms()["loss"].item()))
    (untiled, untiled_loss), (tiled, tiled_loss) = results
    start = StyleTransferModule(small, styles[0], loss=loss, extractor=extractor).loss_terms()["loss"].item()
    assert tiled_loss < 0.7 * start  # it really optimised
    assert abs(tiled_loss - untiled_loss) < 1e-3 * untiled_loss
    assert (tiled - untiled).abs().mean().item() < mean and (tiled - untiled).abs().max().item() < most


def test_a_style_loss_of_other_positions_than_the_gram_is_refused_by_name():
    from nst_lightning.losses import StyleTransferLoss

    criterion = StyleTransferLoss(["relu3_1"], ["relu1_1"], [1.0])
    criterion.style_kind = "moments"
    with pytest.raises(ValueError, match="features.tile cannot evaluate style_loss 'moments'"):
        tiling.check_tileable(criterion)


def test_layer_shapes_follow_the_poolings():
    assert layer_shape(157, 211, "relu1_1") == (157, 211)
    assert layer_shape(157, 211, "pool2") == (157 // 2 // 2, 211 // 2 // 2)
    assert all(stride(n) == 2 ** n.startswith("pool") for n in LAYER_NAMES[:5])


def test_tiles_past_the_deepest_layers_last_position_add_nothing_instead_of_nan(extractor):
    # 40x56 content and a 48x30 style with 16 px tiles: relu5_1 has 2x3 and 3x1 positions, so the last row or
    # column of tiles has an empty interior there (floor pooling drops those pixels), whose Gram is 0, not 0/0
    content = load_image(EXAMPLE_CONTENT, 56)[..., :40, :].contiguous()
    style = load_image(EXAMPLE_STYLE, 48)
    assert style.shape[-2:] == (30, 48)
    module = StyleTransferModule(content, style, extractor=extractor, features={"tile": 16})
    whole = StyleTransferModule(content, style, extractor=extractor)
    module.prepare_targets()
    whole.prepare_targets()
    for name, value in whole.criteria[0].targets().items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(module.criteria[0].targets()[name], value, rtol=1e-5, atol=1e-6 * value.abs().max()), name
    x = (whole.image.detach() / whole.pixel_scale).requires_grad_(True)
    expected = whole.loss_terms(x)
    expected["loss"].sum().backward()
    terms, grad = module.tiled_terms(x.detach())
    assert torch.allclose(terms["loss"], expected["loss"].detach(), rtol=1e-5, atol=0)
    assert ((grad - x.grad).norm() / x.grad.norm()).item() < 1e-4
