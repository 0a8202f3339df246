"""Shared fixtures: tiny real images, the real bundled caffe VGG19, a fast config for runs."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import pytest

from nst_lightning.config import EXAMPLE_CONTENT, EXAMPLE_STYLE, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def _quiet_lightning():
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")
    yield


@pytest.fixture(scope="session")
def content_small():
    from nst_lightning.images import load_image

    return load_image(EXAMPLE_CONTENT, 48)


@pytest.fixture(scope="session")
def style_small():
    from nst_lightning.images import load_image

    return load_image(EXAMPLE_STYLE, 48)


@pytest.fixture(scope="session")
def _pristine_extractor():
    from nst_lightning.config import DEFAULT_STYLE_LAYERS
    from nst_lightning.features import build_extractor

    return build_extractor([*DEFAULT_STYLE_LAYERS, "relu4_2"])


@pytest.fixture
def extractor(_pristine_extractor):
    """The real caffe VGG19 to relu5_1, a fresh copy per test: a fit may convert it, no other test sees that."""
    return copy.deepcopy(_pristine_extractor)


def tiny_overrides(output: Path, steps: int = 6, **extra: object) -> list[str]:
    """--set items for a fast real run: 48 px, a few L-BFGS steps, frequent checkpoints.

    Precision is pinned to fp32: ``auto`` would pick bf16 on some CPUs and fp32 on others, so a test would
    exercise different arithmetic on different machines. Tests about bf16 ask for it explicitly.
    """
    items = {
        "output": str(output),
        "image.size": 48,
        "trainer.max_steps": steps,
        "trainer.accelerator": "cpu",
        "trainer.precision": "32-true",
        "checkpoint.every_n_steps": 2,
        "snapshot.every_n_steps": 3,
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture
def tiny_config(tmp_path):
    """A factory for a tiny RunConfig writing to a fresh temporary run directory."""

    def make(steps: int = 6, output: Path | None = None, **extra: object):
        return load_config(None, tiny_overrides(output or tmp_path / "run", steps, **extra))

    return make
