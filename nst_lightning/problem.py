"""The tensors of a style-transfer problem before the module owns them: inputs checked (files read, tensors
validated), the starting image, masks at the output's shape, each content image's styles, and the fingerprint
check that keeps a checkpoint to the run that wrote it. Plain PyTorch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch

from .errors import CheckpointError, ConfigError
from .groups import FINGERPRINT_KEY
from .images import check_image_tensor, load_image, load_style, resize

ImageInput = Union[str, Path, torch.Tensor]
"""An image given to the module: a ``(1, 3, H, W)`` tensor in ``[0, 1]`` or the path of an image file."""


def digest(t: torch.Tensor) -> str:
    """A short content hash of a tensor's values (fp32 on the CPU): what a checkpoint's fingerprint compares."""
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def describe(value: Any) -> Any:
    """An input as the saved hyperparameters record it: paths as strings, tensors by their shape (never their values)."""
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    return value


def load_inputs(
    content: ImageInput | None, style: Any, size: int, style_scale: float
) -> tuple[torch.Tensor | None, Any]:
    """Content and style as checked tensors: files are read, the content at ``size``, styles at ``style_scale`` of
    its long side; given tensors must be RGB in ``[0, 1]`` (``images.check_image_tensor``)."""
    if isinstance(content, (str, Path)):
        content = load_image(content, size)
    elif content is not None:
        content = check_image_tensor("content", content, batch=True)
    if isinstance(style, (str, Path, torch.Tensor)):
        style = [style]
    if isinstance(style, (list, tuple)) and all(isinstance(s, (str, Path, torch.Tensor)) for s in style):
        if content is None and any(isinstance(s, (str, Path)) for s in style):
            raise ConfigError("style images given as files need a content image; give content=")
        shape = tuple(content.shape[-2:]) if content is not None else None
        style = [load_style(s, shape, style_scale) if isinstance(s, (str, Path)) else check_image_tensor(f"style {i + 1}", s)
                 for i, s in enumerate(style)]
    return content, style


def initial_image(init: str | torch.Tensor, content: torch.Tensor, styles: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    """The starting image: a copy of the content, seeded noise, the first style resized, or a given tensor."""
    shape = tuple(content.shape[-2:])
    if isinstance(init, torch.Tensor):
        return resize(check_image_tensor("init", init).detach().float(), shape).clone()
    if init == "content":
        return content.detach().clone()
    if init == "noise":
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(content.shape, generator=gen, dtype=torch.float32)
    if init == "style":
        return resize(styles[0].detach().float(), shape).clone()
    raise ConfigError(f"init {init!r} is not content, noise, style or an image; load the image and pass a tensor")


def as_mask(mask: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor | None:
    """A mask as ``(1, 1, H, W)`` in ``[0, 1]`` at the output's ``shape`` (an RGB mask is averaged to grey)."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[1] not in (1, 3):
        raise ConfigError(f"a style mask must be (1, 1, H, W) or (1, 3, H, W), got {tuple(mask.shape)}")
    return resize(mask.detach().float().mean(1, keepdim=True), tuple(shape))


def styles_per_image(
    style: torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]] | None, count: int
) -> list[list[torch.Tensor]]:
    """The style images of each of ``count`` content images: one shared list, or one list per image."""
    if style is None:
        raise ValueError("give the style image(s)")
    if isinstance(style, torch.Tensor):
        return [[style]] * count
    items = list(style)
    if items and all(isinstance(s, torch.Tensor) for s in items):
        return [items] * count
    if len(items) != count:
        raise ValueError(f"{len(items)} style lists for {count} content images; give one list per image or one shared")
    return [[s] if isinstance(s, torch.Tensor) else list(s) for s in items]


def check_fingerprint(ours: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> None:
    """Raise CheckpointError unless ``checkpoint`` was written by a run whose fingerprint is ``ours``: the settings
    that differ are named first (a new size also changes the images' digests, which say nothing readable)."""
    theirs = checkpoint.get(FINGERPRINT_KEY)
    if not isinstance(theirs, Mapping) or "image" not in checkpoint.get("state_dict", {}):
        raise CheckpointError("checkpoint was not written by nst-lightning; resume from a checkpoint of this run")
    diffs = [k for k in ours if theirs.get(k) != ours[k]]
    if diffs:
        images = {"content": "another content image", "styles": "other style images"}
        settings = [f"{k} {theirs.get(k)} vs {ours[k]}" for k in diffs if k not in images]
        detail = ", ".join(settings[:3]) if settings else ", ".join(images[k] for k in diffs)
        raise CheckpointError(
            f"checkpoint belongs to another run ({detail}); resume with the same images and settings, "
            "or start a fresh run in a new output directory"
        )
