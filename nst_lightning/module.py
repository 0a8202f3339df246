"""The LightningModule: the output image is its only trainable parameter.

Works in any ``lightning.Trainer`` (the CLI's or the user's): it brings its own trivial dataloader,
logs every loss term, keeps the image in ``[0, 1]`` after each step and refuses checkpoints of
other runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from . import color as colour
from .config import FeaturesConfig, LossConfig, OptimConfig
from .errors import CheckpointError, ConfigError, NumericalError
from .features import VGGFeatures, build_extractor, min_side
from .images import resize
from .layers import LAYER_NAMES, deepest
from .losses import StyleTransferLoss, TemporalTarget

FINGERPRINT_KEY = "nst_lightning"
CHECKPOINT_STATE = ("image", "image_average", "average_accum")
"""The module state a checkpoint keeps: the image and, with iterate averaging, its running average."""

# The frozen VGG stays in eval mode on purpose; Lightning >= 2.5.5 would warn about it on every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def initial_image(init: str | torch.Tensor, content: torch.Tensor, styles: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    """The starting image: a copy of the content, seeded noise, the first style resized, or a given tensor."""
    shape = tuple(content.shape[-2:])
    if isinstance(init, torch.Tensor):
        return resize(init.detach().float(), shape).clone()
    if init == "content":
        return content.detach().clone()
    if init == "noise":
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(content.shape, generator=gen, dtype=torch.float32)
    if init == "style":
        return resize(styles[0].detach().float(), shape).clone()
    raise ConfigError(f"init {init!r} is not content, noise, style or an image; load the image and pass a tensor")


def config_extractor(features: FeaturesConfig, layers: Sequence[str]) -> VGGFeatures:
    """The frozen VGG19 extractor a ``features`` config section describes, returning ``layers``."""
    return build_extractor(
        layers,
        weights=features.weights,
        pooling=features.pooling,
        preprocessing=features.preprocessing,
        allow_download=features.allow_download,
    )


def network_dtype(precision: str) -> torch.dtype:
    """The dtype the frozen VGG runs in under a Trainer ``precision``: bf16 for bf16 precisions, else fp32."""
    return torch.bfloat16 if precision.startswith("bf16") else torch.float32


def _as_mask(mask: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor | None:
    """A mask as ``(1, 1, H, W)`` in ``[0, 1]`` at the output's ``shape`` (an RGB mask is averaged to grey)."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[1] not in (1, 3):
        raise ConfigError(f"a style mask must be (1, 1, H, W) or (1, 3, H, W), got {tuple(mask.shape)}")
    return resize(mask.detach().float().mean(1, keepdim=True), tuple(shape))


class StyleTransferModule(L.LightningModule):
    """Neural style transfer (Gatys et al. 2015) as a LightningModule.

    Args:
        content: content image, ``(1, 3, H, W)`` RGB in ``[0, 1]``; the output has its size.
        style: one style image or several (any sizes), same format.
        loss, optim, features: settings (config sections or plain dicts); defaults follow the paper.
            ``features.checkpoint_blocks=auto`` is resolved from the memory estimate by ``nst_lightning.fit``;
            a module built directly treats it as 0 (no checkpointing).
        init: ``content``, ``noise``, ``style`` or an image tensor.
        style_blend: weight of each style image (default equal).
        style_masks: one mask per style (``(1, 1, H, W)`` or RGB, any size, white = apply), or None for
            the whole image; regions no mask covers keep only the content loss.
        color: ``none`` (the style's colours), ``luminance`` (keep the content's chroma) or ``histogram``
            (recolour the styles to the content's colour statistics first); see ``nst_lightning.color``.
        extractor: a prebuilt ``VGGFeatures`` to share between modules; built from ``features`` otherwise.
        target_cache: a dict shared between modules of the same images and layers, so targets are computed once.
        seed: seeds the ``noise`` init.
        temporal: for a frame of a clip, the previous result warped to this frame, the weights of the pixels
            the warp carries reliably and the term's weight (Ruder et al. 2016); adds the ``temporal`` term.
    """

    pixel_scale: float = 255.0
    """The parameter holds 8-bit pixel units, so L-BFGS's first step has the size the classic tools use."""

    def __init__(
        self,
        content: torch.Tensor,
        style: torch.Tensor | Sequence[torch.Tensor],
        *,
        loss: LossConfig | Mapping[str, Any] | None = None,
        optim: OptimConfig | Mapping[str, Any] | None = None,
        features: FeaturesConfig | Mapping[str, Any] | None = None,
        init: str | torch.Tensor = "content",
        style_blend: Sequence[float] | None = None,
        style_masks: Sequence[torch.Tensor | None] | None = None,
        color: str = "none",
        extractor: VGGFeatures | None = None,
        target_cache: MutableMapping[str, Any] | None = None,
        seed: int = 0,
        temporal: TemporalTarget | None = None,
    ) -> None:
        super().__init__()
        self.loss_config = LossConfig.model_validate(loss or {})
        self.optim_config = OptimConfig.model_validate(optim or {})
        self.features_config = FeaturesConfig.model_validate(features or {})
        styles = [style] if isinstance(style, torch.Tensor) else list(style)
        if content.dim() != 4 or content.shape[:2] != (1, 3):
            raise ValueError(f"content must be (1, 3, H, W), got {tuple(content.shape)}")
        layers = [*self.loss_config.content_layers, *self.loss_config.style_layers]
        need = min_side(layers)
        for name, t in [("content", content), *[("style", s) for s in styles]]:
            if min(t.shape[-2:]) < need:
                raise ConfigError(
                    f"{name} image is {t.shape[-1]}x{t.shape[-2]} px but layers down to "
                    f"{LAYER_NAMES[deepest(layers)]} need at least {need} px per side; "
                    "raise image.size or image.style_scale, or use a less elongated image"
                )
        self.save_hyperparameters(
            {
                "loss": self.loss_config.model_dump(),
                "optim": self.optim_config.model_dump(),
                "features": self.features_config.model_dump(),
                "init": init if isinstance(init, str) else "tensor",
                "style_blend": list(style_blend) if style_blend is not None else None,
                "color": color,
                "style_masks": None if style_masks is None else [m is not None for m in style_masks],
                "seed": seed,
                "image_shape": list(content.shape),
            }
        )
        self.extractor = extractor if extractor is not None else config_extractor(self.features_config, layers)
        blocks = self.features_config.checkpoint_blocks
        self.extractor.checkpoint_blocks(0 if blocks == "auto" else blocks)
        missing = [n for n in layers if n not in self.extractor.layers]
        if missing:
            raise ConfigError(f"the given extractor does not return layers {missing}; build it with all loss layers")
        if style_masks is not None and len(style_masks) != len(styles):
            raise ConfigError(f"{len(style_masks)} style masks for {len(styles)} style images; give one (or None) per style")
        self.color = color
        if color == "luminance":
            self.register_buffer("chroma_source", content.detach().float().clone(), persistent=False)
        seen_content, seen_styles = colour.prepare(color, content.detach().float(), [s.detach().float() for s in styles])
        self.register_buffer("content_image", seen_content.clone(), persistent=False)
        self.style_images = [s.clone() for s in seen_styles]
        self.style_masks = None if style_masks is None else [_as_mask(m, content.shape[-2:]) for m in style_masks]
        self.style_blend = list(style_blend) if style_blend is not None else None
        self.target_cache = target_cache
        self.criterion = StyleTransferLoss(
            self.loss_config.content_layers,
            self.loss_config.style_layers,
            self.loss_config.layer_weights(),
            content_weight=self.loss_config.content_weight,
            style_weight=self.loss_config.style_weight,
            tv_weight=self.loss_config.tv_weight,
            content_loss=self.loss_config.content_loss,
            style_loss=self.loss_config.style_loss,
            tv_loss=self.loss_config.tv_loss,
        )
        if temporal is not None:
            if temporal.image.shape != content.shape or temporal.weights.shape[-2:] != content.shape[-2:]:
                raise ConfigError(
                    f"the temporal target {tuple(temporal.image.shape)} and weights {tuple(temporal.weights.shape)} "
                    f"must match the content {tuple(content.shape)}"
                )
            self.criterion.set_temporal(temporal)
        start = initial_image(init, seen_content, seen_styles, seed)
        if color == "luminance":
            start = colour.luminance(start)
        self.image = nn.Parameter((start * self.pixel_scale).contiguous())  # L-BFGS views the gradient flat
        self.average_decay = self.optim_config.average
        if self.average_decay is not None:
            self.register_buffer("image_average", torch.zeros_like(self.image.detach()))
            self.register_buffer("average_accum", torch.ones(()))
            self.update_average()
        self.fingerprint = {
            "content": _digest(content),
            "styles": [_digest(s) for s in styles],
            "style_blend": self.style_blend,
            "style_masks": None if self.style_masks is None else [m if m is None else _digest(m) for m in self.style_masks],
            "color": color,
            "image_shape": list(content.shape),
            "layers": {"content": self.loss_config.content_layers, "style": self.loss_config.style_layers},
            "weights": self.features_config.weights,
            "preprocessing": self.extractor.preprocessing.name,
            "pooling": self.extractor.pooling,
            "optimizer": self.optim_config.name,
            "average": self.average_decay,
        }
        if temporal is not None:
            self.fingerprint["temporal"] = [_digest(temporal.image), _digest(temporal.weights), float(temporal.weight)]
        self.strict_loading = False
        self._losses_finite: torch.Tensor | None = None

    def forward(self, image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for ``image`` (default: the current output), computing targets on first use."""
        self.prepare_targets()
        x = self.image / self.pixel_scale if image is None else image
        return self.criterion(self.extractor(x), x)

    @torch.no_grad()
    def prepare_targets(self, features: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None) -> None:
        """Compute content features and style Grams once, on the module's current device.

        ``features`` computes the activations instead of the module's extractor, e.g. an exported ONNX
        graph run by onnxruntime; the optimisation itself always uses the torch extractor (it needs gradients).
        Without it, targets may come from ``target_cache``, filled by an earlier module of the same images
        and layers.
        """
        if self.criterion.has_targets:
            return
        cache = self.target_cache if features is None else None
        extract = features if features is not None else self.extractor
        device = self.image.device
        key = self._targets_key()
        if cache is not None and key in cache:
            self.criterion.load_targets(cache[key])
            return
        content_feats = extract(self.content_image.to(device))
        style_feats = [extract(s.to(device)) for s in self.style_images]
        masks = None if self.style_masks is None else [m if m is None else m.to(device) for m in self.style_masks]
        self.criterion.set_targets(content_feats, style_feats, self.style_blend, masks)
        if cache is not None:
            cache[key] = self.criterion.targets()

    def _targets_key(self) -> str:
        """What the targets depend on: images, masks, colour mode, layers, weights and device."""
        parts = {k: v for k, v in self.fingerprint.items() if k not in ("optimizer", "average", "temporal")}
        return json.dumps([parts, str(self.image.device)], sort_keys=True)

    @torch.no_grad()
    def update_average(self) -> None:
        """One step of the bias-corrected exponential moving average of the image (crowsonkb's ``EMA``)."""
        decay = self.average_decay
        self.average_accum.mul_(decay)
        self.image_average.mul_(decay).add_(self.image.detach(), alpha=1.0 - decay)

    def optimised_image(self) -> torch.Tensor:
        """The image being optimised (its running average with ``optim.average``), ``[0, 1]``, on the CPU.

        Under ``color=luminance`` this is the grey luminance image; ``result()`` adds the content's chroma.
        """
        x = self.image.detach()
        if self.average_decay is not None:
            x = self.image_average / (1.0 - self.average_accum)
        return (x / self.pixel_scale).clamp(0.0, 1.0).cpu()

    def result(self) -> torch.Tensor:
        """The output image, ``(1, 3, H, W)`` in ``[0, 1]``, detached on the CPU, colour control applied."""
        x = self.optimised_image()
        if self.color == "luminance":
            x = colour.with_chroma(x, self.chroma_source.cpu())
        return x

    def setup(self, stage: str) -> None:
        """Match the frozen VGG to the Trainer's precision: bf16 weights under bf16-mixed, NHWC layout."""
        self.extractor.optimize(network_dtype(str(self.trainer.precision) if self._trainer is not None else "32-true"))

    def on_fit_start(self) -> None:
        self.prepare_targets()

    def train_dataloader(self) -> Iterator[int]:
        """The image is the only data: an endless stream of placeholders, stopped by ``max_steps``."""
        return itertools.repeat(0)

    def objective(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What the optimiser minimises: the total loss times the number of image elements.

        The scale-free losses give each pixel a gradient of order 1/N; torch's L-BFGS skips curvature pairs
        with y.s < 1e-10, so at 256 px and above it could stand still. Scaled by N the gradients are
        size-independent; L-BFGS directions and Adam steps are otherwise invariant to the factor.
        """
        return terms["loss"] * self.image.numel()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Log the (unscaled) loss terms; hand the optimiser ``objective``."""
        terms = self(None)
        self.log_dict(terms, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        finite = torch.isfinite(terms["loss"].detach())
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite
        return self.objective(terms)

    def on_after_backward(self) -> None:
        """Project the gradient: pixels held at 0 or 255 are not pushed further out of range.

        With the clamp after each step this is a simple projected method; it keeps L-BFGS's curvature
        pairs consistent with the steps actually taken.
        """
        grad = self.image.grad
        if grad is not None:
            x = self.image.detach()
            grad.masked_fill_(((x <= 0) & (grad > 0)) | ((x >= self.pixel_scale) & (grad < 0)), 0.0)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then clamp the image to the valid pixel range (before callbacks save or show it).

        A NaN or infinite loss in any evaluation of the step, or a NaN in the image, puts the image back as
        it was before the step and raises NumericalError, so nothing non-finite is ever saved. One host
        sync per step; the per-evaluation checks stay on the device.
        """
        before = self.image.detach().clone()
        self._losses_finite = None
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.image.clamp_(0.0, self.pixel_scale)
            finite = torch.isfinite(self.image).all()
            if self._losses_finite is not None:
                finite &= self._losses_finite
            if not bool(finite):
                self.image.copy_(before)
                raise NumericalError(self._numerical_advice())
        if self.average_decay is not None:
            self.update_average()

    def _numerical_advice(self) -> str:
        loss = self.loss_config
        return (
            f"the loss or the image became NaN or infinite at step {self.global_step + 1}; lower optim.lr "
            f"(now {self.optim_config.learning_rate:g}) or the loss weights (content_weight {loss.content_weight:g}, "
            f"style_weight {loss.style_weight:g}, tv_weight {loss.tv_weight:g})"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep checkpoints small: the image (and its average) and optimiser state, not the frozen VGG weights."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in CHECKPOINT_STATE}
        checkpoint[FINGERPRINT_KEY] = self.fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint written by a run with other images, size, layers or weights.

        The configured learning rate replaces the saved one, so a run resumed after a NaN with a lower
        ``optim.lr`` really uses it.
        """
        self.check_checkpoint(checkpoint)
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                group["lr"] = self.optim_config.learning_rate

    def check_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Raise CheckpointError unless ``checkpoint`` was written by a run of this module's images and settings."""
        theirs = checkpoint.get(FINGERPRINT_KEY)
        if not isinstance(theirs, Mapping) or "image" not in checkpoint.get("state_dict", {}):
            raise CheckpointError("checkpoint was not written by nst-lightning; resume from a checkpoint of this run")
        diffs = [k for k in self.fingerprint if theirs.get(k) != self.fingerprint[k]]
        if diffs:
            # settings first: a new size also changes the images' digests, which say nothing readable
            images = {"content": "another content image", "styles": "other style images"}
            settings = [f"{k} {theirs.get(k)} vs {self.fingerprint[k]}" for k in diffs if k not in images]
            detail = ", ".join(settings[:3]) if settings else ", ".join(images[k] for k in diffs)
            raise CheckpointError(
                f"checkpoint belongs to another run ({detail}); resume with the same images and settings, "
                "or start a fresh run in a new output directory"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = self.optim_config
        if cfg.name == "adam":
            return torch.optim.Adam([self.image], lr=cfg.learning_rate)
        return torch.optim.LBFGS(
            [self.image],
            lr=cfg.learning_rate,
            max_iter=cfg.max_iter,
            history_size=cfg.history_size,
            line_search_fn=None if cfg.line_search == "none" else cfg.line_search,
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )
