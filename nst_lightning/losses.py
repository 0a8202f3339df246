"""The Gatys et al. loss: content, style (Gram matrices, or the W2 distance of Gaussian fits) and total
variation, always computed in fp32.

Functions hold the maths (the statistics themselves live in ``gram``, ``wasserstein`` and ``smoothness``);
``StyleTransferLoss`` holds the fixed targets as buffers and returns the weighted terms by name. Plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .gram import Features, blend_grams, guided_gram, layer_mask
from .smoothness import border_tv_loss, chroma_matrix, chroma_tv_loss, tv_loss
from .wasserstein import STYLE_STATISTICS, blend_moments, covariance, gaussian_moments, w2_layer_loss, w2_target

def content_loss(features: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``mse``: mean squared error; ``paper``: 1/2 sum of squares (Gatys et al.); ``sum``: sum of squares;
    ``relative``: squared error over the target's squared norm (scale-free, so weights carry across sizes)."""
    sq = (features.float() - target.float()).pow(2)
    if kind == "relative":
        return sq.sum() / target.float().pow(2).sum().clamp_min(1e-12)
    if kind == "mse":
        return sq.mean()
    if kind == "paper":
        return 0.5 * sq.sum()
    if kind == "sum":
        return sq.sum()
    raise ValueError(f"unknown content loss {kind!r}")


def style_layer_loss(
    gram: torch.Tensor, target: torch.Tensor, positions: int, image_pixels: int, kind: str = "paper"
) -> torch.Tensor:
    """Distance of two position-normalised Grams for one layer.

    ``paper``: ``sum (G - A)^2 / (4 N^2)`` with N channels (the paper's normalisation);
    ``keras``: the Keras example's ``sum (G' - A')^2 / (4 * 3^2 * P^2)`` on unnormalised Grams G', with
    P the image's pixel count; ``mean_chw``: the PyTorch tutorials' ``mean((G' - A')^2) / (N * M)`` on
    unnormalised Grams with M = ``positions``; ``relative``: ``|G - A|^2 / |A|^2``, the squared relative
    Gram error, so every layer counts alike whatever its activation scale.
    """
    sq = (gram - target).pow(2).sum()
    if kind == "relative":
        return sq / target.pow(2).sum().clamp_min(1e-12)
    if kind == "paper":
        channels = gram.shape[-1]
        return sq / (4.0 * channels**2)
    if kind == "keras":
        return sq * positions**2 / (4.0 * 9.0 * float(image_pixels) ** 2)
    if kind == "mean_chw":
        return sq * positions / float(gram.shape[-1]) ** 3
    raise ValueError(f"unknown style loss {kind!r}")


def temporal_loss(image: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Ruder et al.'s short-term temporal loss: ``sum c (x - w)^2 / D`` over the image's D values.

    ``target`` is the previous stylised frame warped to this one, ``weights`` (``(1, 1, H, W)``) is 0 where
    the warp cannot be trusted (disocclusions, motion boundaries) and 1 elsewhere; images in ``[0, 1]``.
    """
    return (weights.float() * (image.float() - target.float()).pow(2)).sum() / image.numel()


class TemporalTarget(NamedTuple):
    """What the temporal loss pulls a frame towards: the warped previous result, its weights, the term's weight."""

    image: torch.Tensor
    weights: torch.Tensor
    weight: float


class StyleTransferLoss(nn.Module):
    """Weighted content + style + TV loss against fixed targets (kept as non-persistent buffers).

    Style targets form groups: without masks one group holds the blended Grams (or, for ``w2``, the blended
    moments' Gaussian) of all style images; with masks each style image is its own group, compared through
    guided statistics over its region.
    """

    def __init__(
        self,
        content_layers: Sequence[str],
        style_layers: Sequence[str],
        style_layer_weights: Sequence[float],
        content_weight: float = 1.0,
        style_weight: float = 10.0,
        tv_weight: float = 0.0,
        content_loss: str = "relative",
        style_loss: str = "relative",
        tv_loss: str = "keras",
        chroma_weight: float = 3e-4,
        border_weight: float = 3e-4,
    ) -> None:
        super().__init__()
        if len(style_layer_weights) != len(style_layers):
            raise ValueError("give one weight per style layer")
        self.content_layers = list(content_layers)
        self.style_layers = list(style_layers)
        self.style_layer_weights = [float(w) for w in style_layer_weights]
        self.content_weight = float(content_weight)
        self.style_weight = float(style_weight)
        self.tv_weight = float(tv_weight)
        self.content_kind = content_loss
        self.style_kind = style_loss
        self.tv_kind = tv_loss
        self.chroma_weight = float(chroma_weight)
        self.border_weight = float(border_weight)
        self.group_weights: list[float] = []
        for layer in self.content_layers:
            self.register_buffer(f"content_{layer}", None, persistent=False)
        self.temporal_weight = 0.0
        self.register_buffer("temporal_image", None, persistent=False)
        self.register_buffer("temporal_weights", None, persistent=False)
        self.register_buffer("chroma", chroma_matrix(), persistent=False)

    def set_temporal(self, target: TemporalTarget | None) -> None:
        """Add (or, with None, remove) the temporal term ``temporal`` pulling the image towards ``target.image``."""
        self.temporal_weight = 0.0 if target is None else float(target.weight)
        self.temporal_image = None if target is None else target.image.detach().float().clone()
        self.temporal_weights = None if target is None else target.weights.detach().float().clone()

    @property
    def target_kinds(self) -> tuple[str, ...]:
        """The tensors held per style layer and group: ``gram``, or ``mean``, ``cov`` and ``root`` for ``w2``."""
        return STYLE_STATISTICS.get(self.style_kind, ("gram",))

    @property
    def has_targets(self) -> bool:
        """Whether ``set_targets`` has run."""
        return bool(self.group_weights)

    def targets(self) -> dict[str, torch.Tensor | None | list[float]]:
        """Every target tensor by name plus the group weights, to hand to ``load_targets`` of a like loss."""
        names = [f"content_{layer}" for layer in self.content_layers] + [
            f"{kind}{g}_{layer}"
            for g in range(len(self.group_weights))
            for layer in self.style_layers
            for kind in (*self.target_kinds, "mask")
        ]
        out: dict[str, torch.Tensor | None | list[float]] = {name: getattr(self, name) for name in names}
        out["group_weights"] = list(self.group_weights)
        return out

    def load_targets(self, targets: Mapping[str, torch.Tensor | None | list[float]]) -> None:
        """Reuse targets from ``targets()`` of a loss with the same layers, images and masks."""
        self._clear_groups()
        for name, value in targets.items():
            if name == "group_weights":
                continue
            self.register_buffer(name, value, persistent=False)
        self.group_weights = list(targets["group_weights"])

    def _clear_groups(self) -> None:
        for g in range(len(self.group_weights)):
            for layer in self.style_layers:
                for kind in (*self.target_kinds, "mask"):
                    delattr(self, f"{kind}{g}_{layer}")
        self.group_weights = []

    @torch.no_grad()
    def set_targets(
        self,
        content_features: Features,
        style_features: Sequence[Features],
        blend: Sequence[float] | None = None,
        masks: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        """Store the content activations and the style statistics (Grams or W2 Gaussians) the output is pulled towards.

        ``masks`` (one ``(1, 1, H, W)`` mask or None per style, at the output's size) makes each style
        act only where its mask is white; ``blend`` then weights each style's term relative to the mean.
        """
        self._clear_groups()
        weights = list(blend) if blend is not None else [1.0] * len(style_features)
        with torch.autocast(next(iter(content_features.values())).device.type, enabled=False):
            for layer in self.content_layers:
                setattr(self, f"content_{layer}", content_features[layer].detach().float().clone())
            if masks is None or all(m is None for m in masks):
                groups = [(1.0, None, self._style_targets(style_features, weights))]
            else:
                if len(masks) != len(style_features):
                    raise ValueError(f"{len(masks)} masks for {len(style_features)} style images")
                mean = sum(weights) / len(weights)
                groups = [(w / mean, m, self._style_targets([f], [1.0])) for w, m, f in zip(weights, masks, style_features)]
            for g, (weight, mask, targets) in enumerate(groups):
                for layer in self.style_layers:
                    for kind, tensor in targets[layer].items():
                        self.register_buffer(f"{kind}{g}_{layer}", tensor, persistent=False)
                    shape = content_features[layer].shape[-2:]
                    device = content_features[layer].device
                    lm = None if mask is None else layer_mask(mask.to(device), shape)
                    self.register_buffer(f"mask{g}_{layer}", lm, persistent=False)
                self.group_weights.append(weight)

    def _style_targets(self, style_features: Sequence[Features], blend: Sequence[float]) -> dict[str, dict[str, torch.Tensor]]:
        """Each style layer's target tensors by kind, blending the style images with ``blend``."""
        if self.style_kind == "w2":
            moments = blend_moments(style_features, self.style_layers, blend)
            return {layer: w2_target(*moments[layer]) for layer in self.style_layers}
        grams = blend_grams(style_features, self.style_layers, blend)
        return {layer: {"gram": grams[layer]} for layer in self.style_layers}

    def style_layer(self, features: torch.Tensor, group: int, layer: str, image_pixels: int) -> torch.Tensor:
        """One style layer's unweighted loss for target group ``group``."""
        mask = getattr(self, f"mask{group}_{layer}")
        if self.style_kind == "w2":
            mean, second_moment = gaussian_moments(features, mask)
            target = {kind: getattr(self, f"{kind}{group}_{layer}") for kind in self.target_kinds}
            return w2_layer_loss(mean, covariance(mean, second_moment), target)
        positions = features.shape[-2] * features.shape[-1]
        gram = guided_gram(features, mask)
        return style_layer_loss(gram, getattr(self, f"gram{group}_{layer}"), positions, image_pixels, self.style_kind)

    def smoothness(self, image: torch.Tensor) -> torch.Tensor:
        """The ``tv`` term: weighted total variation, chroma smoothness and border smoothness (0 when no weight is set)."""
        tv = self.tv_weight * tv_loss(image, self.tv_kind) if self.tv_weight else image.new_zeros((), dtype=torch.float32)
        if self.chroma_weight:
            tv = tv + self.chroma_weight * chroma_tv_loss(image, self.chroma).sum()
        if self.border_weight:
            tv = tv + self.border_weight * border_tv_loss(image).sum()
        return tv

    def forward(self, features: Features, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted terms ``content``, ``style``, ``tv`` (and ``temporal`` when set) and their sum ``loss``."""
        if not self.has_targets:
            raise RuntimeError("call set_targets() before computing the loss")
        with torch.autocast(image.device.type, enabled=False):
            content = sum(
                content_loss(features[layer], getattr(self, f"content_{layer}"), self.content_kind)
                for layer in self.content_layers
            ) / len(self.content_layers)
            pixels = image.shape[-2] * image.shape[-1]
            style = image.new_zeros((), dtype=torch.float32)
            for g, group_weight in enumerate(self.group_weights):
                for layer, weight in zip(self.style_layers, self.style_layer_weights):
                    style = style + group_weight * weight * self.style_layer(features[layer], g, layer, pixels)
            terms = {
                "content": self.content_weight * content,
                "style": self.style_weight * style,
                "smoothness": self.smoothness(image),
            }
            terms["loss"] = terms["content"] + terms["style"] + terms["smoothness"]
            if self.temporal_image is not None:
                terms["temporal"] = self.temporal_weight * temporal_loss(image, self.temporal_image, self.temporal_weights)
                terms["loss"] = terms["loss"] + terms["temporal"]
        return terms
