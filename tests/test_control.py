"""Spatial control (masks), style blending and iterate averaging, judged by their effect on real runs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nst_lightning.callbacks import FinalImage
from nst_lightning.config import DEFAULT_STYLE_LAYERS, EXAMPLE_CONTENT, EXAMPLE_STYLE_2
from nst_lightning.images import load_image, read_image
from nst_lightning.gram import gram_matrix, guided_gram, layer_mask
from nst_lightning.module import StyleTransferModule

SIZE = 64


def _fit(module: StyleTransferModule, steps: int, callbacks: list[Callback] | None = None) -> StyleTransferModule:
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=callbacks).fit(module)
    return module


@pytest.fixture(scope="module")
def content():
    return load_image(EXAMPLE_CONTENT, SIZE)


def test_guided_gram_is_the_gram_of_the_masked_region():
    f = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(guided_gram(f, torch.ones(1, 1, 6, 6)), gram_matrix(f))
    left = torch.zeros(1, 1, 6, 6)
    left[..., :3] = 1
    torch.testing.assert_close(guided_gram(f, left), gram_matrix(f[..., :3]))
    assert layer_mask(left, (3, 3))[0, 0].tolist() == [[1.0, 0.5, 0.0]] * 3


def test_a_masked_out_region_stays_close_to_the_content(content, style_small, extractor):
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., : SIZE // 2] = 1.0  # style the left half only
    result = _fit(StyleTransferModule(content, style_small, extractor=extractor, style_masks=[mask]), 10).result()
    change = (result - content).abs().mean(1)[0]
    styled, kept = change[:, : SIZE // 2].mean(), change[:, 3 * SIZE // 4 :].mean()
    assert styled > 0.05
    assert kept < 0.3 * styled


def _style_distance(extractor, image, style):
    fx, fs = extractor(image), extractor(style)
    return sum(
        (torch.linalg.norm(gram_matrix(fx[n]) - gram_matrix(fs[n])) / torch.linalg.norm(gram_matrix(fs[n]))).item()
        for n in DEFAULT_STYLE_LAYERS
    ) / len(DEFAULT_STYLE_LAYERS)


def test_blend_weights_move_the_result_between_two_styles(content_small, style_small, extractor):
    scream = load_image(EXAMPLE_STYLE_2, 48)
    results = {
        blend: _fit(StyleTransferModule(content_small, [style_small, scream], extractor=extractor, style_blend=blend), 8).result()
        for blend in [(0.8, 0.2), (0.2, 0.8)]
    }
    to_starry = {b: _style_distance(extractor, r, style_small) for b, r in results.items()}
    to_scream = {b: _style_distance(extractor, r, scream) for b, r in results.items()}
    assert to_starry[(0.8, 0.2)] < 0.8 * to_starry[(0.2, 0.8)]
    assert to_scream[(0.2, 0.8)] < 0.8 * to_scream[(0.8, 0.2)]


class _Iterates(Callback):
    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self.images.append(pl_module.image.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.images.append(pl_module.image.detach().clone())


def test_iterate_averaging_writes_the_bias_corrected_average_of_adams_iterates(content_small, style_small, extractor, tmp_path):
    decay = 0.8
    seen = _Iterates()
    final = tmp_path / "final.png"
    module = StyleTransferModule(content_small, style_small, extractor=extractor, optim={"name": "adam", "average": decay})
    _fit(module, 6, [seen, FinalImage(final)])
    n = len(seen.images)
    weights = torch.tensor([(1 - decay) * decay ** (n - 1 - i) for i in range(n)])
    expected = sum(w * x for w, x in zip(weights, seen.images)) / weights.sum() / 255.0
    torch.testing.assert_close(module.result(), expected.clamp(0, 1), atol=1e-5, rtol=0)
    last = seen.images[-1] / 255.0
    assert (module.result() - last).abs().max() > 0.01
    assert (read_image(final) - expected).abs().max() <= 1 / 255 + 1e-6
    assert {"image_average", "average_accum"} <= set(module.state_dict())


def test_a_black_mask_file_keeps_the_whole_image_unstyled(tiny_config, tmp_path):
    from PIL import Image

    from nst_lightning.api import fit, load_images

    black = tmp_path / "nowhere.png"
    Image.new("L", (20, 20), 0).save(black)
    # no style anywhere and no smoothness terms (on by default, they would smooth the content's colour and edges)
    smoothness_off = {"loss.chroma_weight": 0, "loss.border_weight": 0}
    cfg = tiny_config(steps=3, style_masks=f"[{black}]", **{"image.size": 32, **smoothness_off})
    out = fit(cfg, progress=False)
    content, _ = load_images(cfg)
    assert (read_image(out.final) - content).abs().max() <= 1 / 255 + 1e-6
