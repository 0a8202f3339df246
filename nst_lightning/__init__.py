"""nst-lightning: neural style transfer (Gatys et al. 2015) as a PyTorch Lightning module.

Importing the package is cheap; torch and lightning load when one of the names below is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "StyleTransferModule": ".module",
    "VGGFeatures": ".features",
    "build_extractor": ".features",
    "StyleTransferLoss": ".losses",
    "gram_matrix": ".gram",
    "load_image": ".images",
    "save_image": ".images",
    "run": ".api",
    "fit": ".api",
    "fit_batch": ".api",
    "fit_clip": ".api",
    "fit_clips": ".api",
    "StylePairsDataModule": ".data",
    "ImageLogger": ".image_logging",
    "FinalImage": ".callbacks",
    "ImageSnapshots": ".callbacks",
    "expand_pairs": ".pairs",
    "RunConfig": ".config",
    "load_config": ".config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
