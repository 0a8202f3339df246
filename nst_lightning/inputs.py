"""A run's inputs from its config: images and styles through the config's one ``Loading``, masks, the init, the module.

Every run kind (single, stage, sweep cell, folder, clip frame) loads through these functions, so a setting of the
``image`` section cannot be honoured by one kind and dropped by another.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import INIT_KEYWORDS, FeaturesConfig, OptimConfig, RunConfig
from .errors import ConfigError
from .features import VGGFeatures
from .images import Loading, frame_count, load_image, load_style, read_image, read_size, style_side, target_shape
from .losses import TemporalTarget
from .module import StyleTransferModule

UPSCALE_WARNING = 2.0
"""An input enlarged more than this many times is reported: the run sees a blurred, blocky image."""


def loading(config: RunConfig) -> Loading:
    """How the config's ``image`` section resamples, rounds and fits every image and frame it loads."""
    return Loading(**config.image.loading())


def load_styles(config: RunConfig, shape: Sequence[int]) -> list[torch.Tensor]:
    """Each style image beside a ``shape`` (H, W) output, scaled by its ``style_scale``."""
    return [load_style(p, tuple(shape), s, loading(config)) for p, s in zip(config.styles, config.style_scales())]


def load_images(config: RunConfig, size: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The content image at ``size`` (default ``image.size``) and each style image scaled by its ``style_scale``."""
    content = load_image(config.content, size or config.image.size, config.image.fit, loading(config))
    return content, load_styles(config, content.shape[-2:])


def load_masks(config: RunConfig) -> list[torch.Tensor | None] | None:
    """Each style's mask image at full size (the module fits it to the output), or None."""
    if config.style_masks is None:
        return None
    return [None if path is None else read_image(path) for path in config.style_masks]


def init_input(config: RunConfig) -> str | torch.Tensor:
    """``config.init`` as the module takes it: a keyword (content, noise, style) or the loaded image."""
    if config.init in INIT_KEYWORDS:
        return config.init
    if not Path(config.init).exists():
        raise ConfigError(
            f"init {config.init!r} is none of {', '.join(INIT_KEYWORDS)} and no image exists at that path; "
            "set init to content, noise, style or an image file"
        )
    return load_image(config.init)


def input_warnings(config: RunConfig) -> list[str]:
    """One line per input the run will use in a way the user may not expect: animated (first frame used),
    enlarged many times over, or a style mask stretched to other proportions than the output's."""
    out = []
    for role, path in [("content", config.content), *(("style", p) for p in config.styles)]:
        frames = frame_count(path)
        if frames > 1:
            out.append(f"{role} image {path} has {frames} frames (animated or multi-page); only the first is used")
    height, width = read_size(config.content)
    side = {"long": max(height, width), "short": min(height, width), "height": height, "width": width}[config.image.fit]
    if config.image.size > UPSCALE_WARNING * side:
        out.append(
            f"content image {config.content} is {width}x{height} px and is enlarged {config.image.size / side:.0f}x to "
            f"image.size={config.image.size}; the result will look blurred, so give a larger image or a smaller image.size"
        )
    shape = target_shape(height, width, config.image.size, config.image.fit, config.image.rounding)
    for path, scale in zip(config.styles, config.style_scales()):
        long_side, wanted = max(read_size(path)), style_side(shape, scale)
        if wanted > UPSCALE_WARNING * long_side:
            out.append(
                f"style image {path} is {long_side} px on its long side and is enlarged {wanted / long_side:.0f}x; "
                "its texture will look blurred, so give a larger style image or a smaller image.style_scale"
            )
    for path in [p for p in config.style_masks or [] if p]:
        mh, mw = read_size(path)
        if abs(mw / mh - width / height) > 0.01 * (width / height):
            out.append(
                f"style mask {path} is {mw}x{mh} but the content is {width}x{height}; the mask is stretched to the "
                "output's proportions, so crop it to the content's to place the style exactly"
            )
    return out


def build_module(
    config: RunConfig,
    content: torch.Tensor | None,
    styles: list[torch.Tensor] | None,
    *,
    masks: list[torch.Tensor | None] | None = None,
    init: str | torch.Tensor | None = None,
    extractor: VGGFeatures | None = None,
    target_cache: MutableMapping[str, Any] | None = None,
    features: FeaturesConfig | None = None,
    optim: OptimConfig | None = None,
    temporal: TemporalTarget | None = None,
) -> StyleTransferModule:
    """The LightningModule for ``config`` and already loaded images (``init``, ``features`` and ``optim``, as a
    memory plan resolves them, override the config's);
    without images, a module for a folder run, fed by ``StylePairsDataModule``. ``temporal`` adds the temporal
    term of a clip's frame."""
    return StyleTransferModule(
        content,
        styles,
        loss=config.loss,
        optim=optim or config.optim,
        features=features or config.features,
        init=init_input(config) if init is None else init,
        style_blend=config.style_blend,
        style_masks=masks,
        color=config.color,
        extractor=extractor,
        target_cache=target_cache,
        seed=config.seed,
        temporal=temporal,
        grow_checkpoint_blocks=config.features.checkpoint_blocks == "auto",
    )
