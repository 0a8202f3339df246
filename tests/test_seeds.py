"""Each seed config's loss at its starting image equals an independent port of that seed's formulas.

The ports (``tests/seed_reference.py``) load the images as each seed does and compute its loss on their own
VGG19; the package computes the loss through ``load_config`` -> ``load_images`` -> the module. Small sizes
keep the suite fast; ``benchmarks/seeds.py`` prints the same comparison at each config's own size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nst_lightning import load_config
from nst_lightning.api import build_module, load_images
from tests import seed_reference as ref

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def package_step0_loss(config: str, size: int) -> float:
    """The package's total loss at the starting image of ``configs/<config>``, fp32, at ``image.size = size``."""
    cfg = load_config(CONFIGS / config, [f"image.size={size}", "trainer.precision=32-true"])
    content, styles = load_images(cfg)
    module = build_module(cfg, content, styles)
    with torch.no_grad():
        return float(module()["loss"])


SEEDS = [
    ("keras_example.yaml", lambda c, s, n: ref.keras_notebook_loss(c, s, rows=n)),
    ("tf_tutorial.yaml", lambda c, s, n: ref.tf_tutorial_loss(c, s, max_dim=n)),
    ("pytorch_tutorial.yaml", lambda c, s, n: ref.pytorch_tutorial_loss(c, s, max_size=n)),
    ("pytorch_lbfgs.yaml", lambda c, s, n: ref.pytorch_tutorial_loss(c, s, max_size=n)),
]


@pytest.mark.parametrize(("config", "reference"), SEEDS, ids=[c for c, _ in SEEDS])
def test_step0_loss_matches_the_seed_formula(config, reference):
    cfg = load_config(CONFIGS / config)
    size = 80
    expected = reference(cfg.content, cfg.style, size)
    got = package_step0_loss(config, size)
    assert expected > 0
    assert got == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize("config", [*(c for c, _ in SEEDS), "gatys2015.yaml", "crowsonkb.yaml"])
def test_seed_configs_optimise_as_their_seeds_without_the_default_preconditioner(config):
    assert load_config(CONFIGS / config).optim.resolved_precondition_levels == 0


def test_keras_loading_truncates_the_width_and_stretches_the_style():
    cfg = load_config(CONFIGS / "keras_example.yaml", ["image.size=97"])
    content, styles = load_images(cfg)
    from PIL import Image

    width, height = Image.open(cfg.content).size
    assert tuple(content.shape[-2:]) == (97, int(width * 97 / height))
    assert tuple(styles[0].shape[-2:]) == tuple(content.shape[-2:])


def test_pytorch_tutorial_sets_the_short_side():
    cfg = load_config(CONFIGS / "pytorch_tutorial.yaml", ["image.size=90"])
    content, styles = load_images(cfg)
    assert min(content.shape[-2:]) == 90
    assert styles[0].shape == content.shape


def test_the_fitted_side_is_exactly_the_size_when_its_scale_is_inexact_in_floating_point(tmp_path):
    # 103 rows fitted to 64: 103 * (64 / 103) is 63.99999999999999 in floating point, which truncation made 63 rows
    # (the 1054x1331 photo of the report: 399 rows for image.size 400, and a step-0 loss 7.5% off the notebook's)
    from PIL import Image

    from nst_lightning.config import EXAMPLE_CONTENT

    content = tmp_path / "portrait.png"
    Image.open(EXAMPLE_CONTENT).convert("RGB").resize((82, 103)).save(content)
    cfg = load_config(CONFIGS / "keras_example.yaml", [f"content={content}", "image.size=64", "trainer.precision=32-true"])
    loaded, styles = load_images(cfg)
    assert tuple(loaded.shape[-2:]) == (64, int(82 * 64 / 103)) == (64, 50)
    with torch.no_grad():
        got = float(build_module(cfg, loaded, styles)()["loss"])
    assert got == pytest.approx(ref.keras_notebook_loss(str(content), cfg.style, rows=64), rel=2e-3)
