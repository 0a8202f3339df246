"""The LightningModule and the one optimisation engine of every run: the output images are its only parameter.

Single runs, coarse-to-fine stages, sweep cells and folder runs all train this module with ``Trainer.fit``.
Works in any ``lightning.Trainer`` (the CLI's or the user's): it brings its own trivial dataloader (or
takes groups of pairs from ``StylePairsDataModule``), keeps the images in ``[0, 1]`` after every update,
reads nothing back from the device between logging steps and refuses checkpoints of other runs. The
step is ``training_step``: ``optimizer.step(self.evaluate)``, the package's only call of an optimiser.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import warnings
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from torch import nn
import torch.nn.functional as F

from . import color as colour
from .config import INIT_KEYWORDS, MAX_CHECKPOINT_BLOCKS, FeaturesConfig, LossConfig, OptimConfig
from .callbacks import CudnnBenchmark
from .data import GroupStep
from .errors import CheckpointError, ConfigError, NumericalError
from .features import VGGFeatures, extractor_for, min_side
from .groups import FINGERPRINT_KEY, FolderGroups
from .history import LOSS_TERMS
from .images import check_image_tensor, load_image, load_style, read_image, resize
from .layers import LAYER_NAMES, deepest
from .losses import StyleTransferLoss, TemporalTarget
from .resources import is_out_of_memory
from .cudagraph import StepGraph
from .optim import BatchedAdam, BatchedLBFGS
from .tiling import TILED_STYLE_LOSSES, tiled_targets, tiled_terms

log = logging.getLogger(__name__)
ImageInput = Union[str, Path, torch.Tensor]
"""An image given to the module: a ``(1, 3, H, W)`` tensor in ``[0, 1]`` or the path of an image file."""
CHECKPOINT_STATE = ("image", "objective_scale", "image_average", "average_accum")
"""The module state a checkpoint keeps: the image, the objective's scale and, with iterate averaging, its
running average."""

# The frozen VGG stays in eval mode on purpose; Lightning >= 2.5.5 would warn about it on every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# Checkpoints hold the state after the step on purpose (that is where a resume continues).
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _describe(value: Any) -> Any:
    """An input as the saved hyperparameters record it: paths as strings, tensors by their shape (never their values)."""
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    return value


def _load_inputs(
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
    """Neural style transfer (Gatys et al. 2015) as a LightningModule: the engine of every run.

    The trainable parameter is a batch of output images ``(B, 3, H, W)``, each with its own targets; a
    single run is B = 1, a folder run optimises groups of same-size pairs (``StylePairsDataModule`` feeds
    them as batches). Every Trainer step runs ``optim.max_iter`` evaluations and updates without reading
    a value back from the device; losses are logged, and the NaN guard read, on logging steps only.

    Args:
        content: content image(s), ``(B, 3, H, W)`` RGB in ``[0, 1]``, or an image file loaded at ``size``; the
            output has their size. None for a module fed groups of pairs by ``StylePairsDataModule``.
        style: one style image or several blended (tensors of any size, or files loaded at ``style_scale``
            times the content's long side), shared by every content image; or, for a batch, one list of style
            images per content image.
        size: long side in pixels of a content image given as a file (tensors are used as they are).
        style_scale: long side of style images given as files, relative to the content's long side.
        loss, optim, features: settings (config sections or plain dicts); defaults follow the paper.
            ``features.checkpoint_blocks=auto`` is resolved from the memory estimate by ``nst_lightning.fit``;
            a module built directly treats it as 0 (no checkpointing), and ``features.tile=auto`` as off.
        init: ``content``, ``noise``, ``style``, an image tensor or an image file.
        style_blend: weight of each style image (default equal).
        style_masks: one mask per style (``(1, 1, H, W)`` or RGB tensor or an image file, any size, white = apply), or None for
            the whole image; regions no mask covers keep only the content loss.
        color: ``none`` (the style's colours), ``luminance`` (keep the content's chroma) or ``histogram``
            (recolour the styles to the content's colour statistics first); see ``nst_lightning.color``.
        extractor: a prebuilt ``VGGFeatures`` to share between modules (never changed by use); built from
            ``features`` otherwise.
        target_cache: a dict shared between modules of the same images and layers, so targets are computed once.
        seed: seeds the ``noise`` init.
        temporal: for a frame of a clip, the previous result warped to this frame, the weights of the pixels
            the warp carries reliably and the term's weight (Ruder et al. 2016); adds the ``temporal`` term.
    """

    pixel_scale: float = 255.0
    """The parameter holds 8-bit pixel units, so L-BFGS's first step has the size the classic tools use."""

    def __init__(
        self,
        content: str | Path | torch.Tensor | None = None,
        style: Sequence[ImageInput] | ImageInput | Sequence[Sequence[torch.Tensor]] | None = None,
        *,
        size: int = 512,
        style_scale: float = 1.0,
        loss: LossConfig | Mapping[str, Any] | None = None,
        optim: OptimConfig | Mapping[str, Any] | None = None,
        features: FeaturesConfig | Mapping[str, Any] | None = None,
        init: str | Path | torch.Tensor = "content",
        style_blend: Sequence[float] | None = None,
        style_masks: Sequence[Optional[ImageInput]] | None = None,
        color: Literal["none", "luminance", "histogram"] = "none",
        extractor: VGGFeatures | None = None,
        target_cache: MutableMapping[str, Any] | None = None,
        seed: int = 0,
        temporal: TemporalTarget | None = None,
        grow_checkpoint_blocks: bool | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.loss_config = LossConfig.model_validate(loss or {})
        self.optim_config = OptimConfig.model_validate(optim or {})
        self.features_config = FeaturesConfig.model_validate(features or {})
        self.layers = [*self.loss_config.content_layers, *self.loss_config.style_layers]
        self.save_hyperparameters(
            {
                "content": _describe(content),
                "style": _describe(style),
                "size": size,
                "style_scale": style_scale,
                "loss": self.loss_config.model_dump(),
                "optim": self.optim_config.model_dump(),
                "features": self.features_config.model_dump(),
                "init": _describe(init),
                "style_blend": list(style_blend) if style_blend is not None else None,
                "color": color,
                "style_masks": None if style_masks is None else [_describe(m) for m in style_masks],
                "seed": seed,
                "image_shape": None,
            }
        )
        content, style = _load_inputs(content, style, size, style_scale)
        if isinstance(init, (str, Path)) and str(init) not in INIT_KEYWORDS:
            init = load_image(init)
        if style_masks is not None:
            style_masks = [m if m is None or isinstance(m, torch.Tensor) else read_image(m) for m in style_masks]
        self.extractor = extractor if extractor is not None else extractor_for(self.features_config, self.layers)
        missing = [n for n in self.layers if n not in self.extractor.layers]
        if missing:
            raise ConfigError(f"the given extractor does not return layers {missing}; build it with all loss layers")
        blocks = self.features_config.checkpoint_blocks
        self.checkpoint_blocks = 0 if blocks == "auto" else blocks
        tile = self.features_config.tile
        self.tile = tile if isinstance(tile, int) else 0
        """Evaluate the loss tile by tile with tiles of this side (``nst_lightning.tiling``); 0: the whole image at once."""
        if self.tile and self.loss_config.style_loss not in TILED_STYLE_LOSSES:
            raise ConfigError(
                f"features.tile cannot evaluate style_loss {self.loss_config.style_loss} by tiles; use one of "
                f"{', '.join(TILED_STYLE_LOSSES)} or features.tile=off"
            )
        self.grow_checkpoint_blocks = blocks == "auto" if grow_checkpoint_blocks is None else grow_checkpoint_blocks
        self._stepped = False
        self.network: VGGFeatures = self.extractor
        self.margin = self.features_config.margin
        self.color = color
        self.init = init
        self.seed = seed
        self.style_blend = list(style_blend) if style_blend is not None else None
        self.raw_style_masks = None if style_masks is None else list(style_masks)
        self.target_cache = target_cache
        self.temporal = temporal
        self.average_decay = self.optim_config.average
        self.strict_loading = False
        self.step_terms: torch.Tensor | None = None
        """The loss terms (content, style, tv, loss; mean over the batch) at the image this step started from."""
        self._first_evaluation = True
        self._scale_ready = False
        self.ran_out_of_memory = False
        """A folder run's group did not fit in its last step (the step was dropped; ``FolderGroups`` fails the group)."""
        self.criteria = nn.ModuleList()
        self.style_images: list[list[torch.Tensor]] = []
        self.style_masks: list[torch.Tensor | None] | None = None
        self.fingerprint: dict[str, Any] = {}
        self.image = nn.Parameter(torch.zeros(0, 3, 1, 1))
        if content is not None:
            self.set_images(content, style)

    # ----------------------------------------------------------------------------------- the problem
    def set_images(
        self, content: torch.Tensor, style: torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]] | None
    ) -> None:
        """Make ``content`` (``(B, 3, H, W)``) and its styles the problem: targets, starting image, fresh state."""
        if content.dim() != 4 or content.shape[1] != 3:
            raise ValueError(f"content must be (B, 3, H, W), got {tuple(content.shape)}")
        per_image = _styles_per_image(style, content.shape[0])
        self.check_sizes(content, [s for styles in per_image for s in styles])
        masks = self.raw_style_masks
        if masks is not None and any(len(masks) != len(styles) for styles in per_image):
            raise ConfigError(f"{len(masks)} style masks for {len(per_image[0])} style images; give one (or None) per style")
        device = self.image.device
        content = content.detach().float()
        self.style_masks = None if masks is None else [
            None if m is None else self.canvas(_as_mask(m, content.shape[-2:])) for m in masks
        ]
        seen = [colour.prepare(self.color, content[i : i + 1], [s.detach().float() for s in per_image[i]]) for i in range(len(per_image))]
        self.register_buffer("content_image", torch.cat([c for c, _ in seen]).to(device), persistent=False)
        self.style_images = [[s.clone() for s in styles] for _, styles in seen]
        self.register_buffer("chroma_source", content.clone().to(device) if self.color == "luminance" else None, persistent=False)
        self.criteria = nn.ModuleList([self._criterion() for _ in per_image]).to(device)
        if self.temporal is not None:
            t = self.temporal
            if content.shape[0] != 1 or t.image.shape != content.shape or t.weights.shape[-2:] != content.shape[-2:]:
                raise ConfigError(
                    f"the temporal target {tuple(t.image.shape)} and weights {tuple(t.weights.shape)} "
                    f"must match one content image {tuple(content.shape)}"
                )
            self.criteria[0].set_temporal(t)
        start = torch.cat([initial_image(self.init, c, styles, self.seed) for c, styles in seen])
        if self.color == "luminance":
            start = colour.luminance(start)
        self.image = nn.Parameter((start * self.pixel_scale).to(device).contiguous())
        self.register_buffer("objective_scale", torch.ones(len(per_image), device=device))
        self._scale_ready = False
        self.register_buffer("last_good", self.image.detach().clone(), persistent=False)
        self.register_buffer("finite", torch.ones(len(per_image), dtype=torch.bool, device=device), persistent=False)
        if self.average_decay is not None:
            self.register_buffer("image_average", torch.zeros_like(self.image.detach()))
            self.register_buffer("average_accum", torch.ones((), device=device))
            self.update_average()
        self.fingerprint = {
            "content": _digest(content),
            "styles": [_digest(s) for s in per_image[0]] if len(per_image) == 1 else [[_digest(s) for s in st] for st in per_image],
            "style_blend": self.style_blend,
            "style_masks": None if self.style_masks is None else [m if m is None else _digest(m) for m in self.style_masks],
            "color": self.color,
            "image_shape": list(content.shape),
            "layers": {"content": self.loss_config.content_layers, "style": self.loss_config.style_layers},
            "weights": self.features_config.weights,
            "preprocessing": self.extractor.preprocessing.name,
            "pooling": self.extractor.pooling,
            "padding": self.extractor.padding,
            "margin": self.margin,
            "optimizer": self.optim_config.name,
            "average": self.average_decay,
        }
        if self.temporal is not None:
            t = self.temporal
            self.fingerprint["temporal"] = [_digest(t.image), _digest(t.weights), float(t.weight)]
        self.hparams["image_shape"] = list(content.shape)
        self.step_terms = None
        self._stepped = False

    def canvas(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` with ``features.margin`` mirrored pixels on every side: what VGG sees of the output and content.

        VGG's zero padding shows the network a frame around the image, and the output learns 1-2 px bright or dark
        strips there; with the margin the frame lies in mirrored pixels that are never saved, and the image's own
        border is seen with its neighbourhood, as an interior row is.
        """
        m = self.margin
        return F.pad(image, (m, m, m, m), mode="reflect") if m else image

    def check_sizes(self, content: torch.Tensor, styles: Sequence[torch.Tensor]) -> None:
        """ConfigError when an image is too small for the deepest loss layer or the mirrored margin."""
        if self.margin and min(content.shape[-2:]) <= self.margin:
            raise ConfigError(
                f"content image is {content.shape[-1]}x{content.shape[-2]} px, too small to mirror a "
                f"features.margin of {self.margin} px; lower features.margin or raise image.size"
            )
        need = min_side(self.layers)
        for name, t in [("content", content), *[("style", s) for s in styles]]:
            if min(t.shape[-2:]) < need:
                raise ConfigError(
                    f"{name} image is {t.shape[-1]}x{t.shape[-2]} px but layers down to "
                    f"{LAYER_NAMES[deepest(self.layers)]} need at least {need} px per side; "
                    "raise image.size or image.style_scale, or use a less elongated image"
                )

    def _criterion(self) -> StyleTransferLoss:
        cfg = self.loss_config
        return StyleTransferLoss(
            cfg.content_layers,
            cfg.style_layers,
            cfg.layer_weights(),
            content_weight=cfg.content_weight,
            style_weight=cfg.style_weight,
            tv_weight=cfg.tv_weight,
            content_loss=cfg.content_loss,
            style_loss=cfg.style_loss,
            tv_loss=cfg.tv_loss,
            chroma_weight=cfg.chroma_weight,
            border_weight=cfg.border_weight,
        )

    @property
    def batch_size(self) -> int:
        """How many images are optimised together."""
        return self.image.shape[0]

    # ----------------------------------------------------------------------------------- evaluation
    def forward(self, image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms (mean over the batch) for ``image`` (default: the current output), computing targets on first use."""
        return {k: v.mean() for k, v in self.loss_terms(image).items()}

    def loss_terms(self, image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each image's loss terms ``content``, ``style``, ``tv``, ``loss`` as ``(B,)`` tensors: one VGG pass for the batch.

        With ``features.tile`` the terms are evaluated tile by tile and carry no autograd graph.
        """
        self.prepare_targets()
        x = self.image / self.pixel_scale if image is None else image
        if self.tile:
            return self.tiled_terms(x, gradient=False)[0]
        feats = self.network(self.canvas(x), checkpoint_blocks=self.checkpoint_blocks)
        per_image = [
            criterion({k: v[i : i + 1] for k, v in feats.items()}, x[i : i + 1]) for i, criterion in enumerate(self.criteria)
        ]
        return {k: torch.stack([t[k] for t in per_image]) for k in LOSS_TERMS}

    def tiled_terms(self, image: torch.Tensor, gradient: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The loss terms at ``image`` (``[0, 1]``) and, with ``gradient``, their summed gradient, tile by tile."""
        return tiled_terms(self.network, self.criteria, image, self.tile, self.canvas, gradient=gradient)

    @torch.no_grad()
    def prepare_targets(self, features: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None) -> None:
        """Compute each image's content features and style Grams once, on the module's current device, in fp32.

        ``features`` computes the activations instead of the module's extractor, e.g. an exported ONNX
        graph run by onnxruntime; the optimisation itself always uses the torch extractor (it needs gradients).
        Without it, targets may come from ``target_cache``, filled by an earlier module of the same images
        and layers.
        """
        if all(c.has_targets for c in self.criteria):
            return
        cache = self.target_cache if features is None else None
        extract = features if features is not None else self.extractor
        device = self.image.device
        masks = None if self.style_masks is None else [m if m is None else m.to(device) for m in self.style_masks]
        with torch.autocast(device.type, enabled=False):
            for i, criterion in enumerate(self.criteria):
                key = self._targets_key(i) if cache is not None else ""
                if cache is not None and key in cache:
                    criterion.load_targets(cache[key])
                    continue
                if self.tile and features is None:
                    canvas = self.canvas(self.content_image[i : i + 1].to(device))
                    styles = [s.to(device) for s in self.style_images[i]]
                    criterion.load_targets(tiled_targets(extract, criterion, canvas, styles, self.tile, self.style_blend, masks))
                    if cache is not None:
                        cache[key] = criterion.targets()
                    continue
                content_feats = extract(self.canvas(self.content_image[i : i + 1].to(device)))
                style_feats = [extract(s.to(device)) for s in self.style_images[i]]
                criterion.set_targets(content_feats, style_feats, self.style_blend, masks)
                if cache is not None:
                    cache[key] = criterion.targets()

    def _targets_key(self, index: int) -> str:
        """What image ``index``'s targets depend on: its images, masks, colour mode, layers, weights and device."""
        parts = {k: v for k, v in self.fingerprint.items() if k not in ("optimizer", "average", "content", "styles", "image_shape", "temporal")}
        images = [_digest(self.content_image[index]), [_digest(s) for s in self.style_images[index]]]
        return json.dumps([parts, images, str(self.image.device)], sort_keys=True)

    # ----------------------------------------------------------------------------------- the step
    def objective(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What the optimiser minimises: each image's total loss times its ``objective_scale``, summed.

        The scale, fixed at the first evaluation, makes each image's gradient at its starting point one pixel
        unit per element on average, whatever the loss kind (the paper's and Keras' losses reach 1e13 per
        pixel, the relative ones 1e-6). L-BFGS takes a plain gradient step of that size whenever it has no
        curvature pair and skips pairs with y.s < 1e-10: unscaled, a 1e13 gradient threw every pixel to 0 or
        255 under bf16 (whose input resolution swallowed the tiny first step), and the relative losses stood
        still at 256 px and above. Directions are otherwise invariant to the factor. The sum keeps the images
        independent: each one's gradient is its own loss's.
        """
        if not self._scale_ready:
            self._set_objective_scale(terms["loss"])
        return (terms["loss"] * self.objective_scale).sum()

    def _set_objective_scale(self, losses: torch.Tensor) -> None:
        """``objective_scale = 1 / mean |d loss_i / d image_i|`` per image at the current images, without a host
        sync (the element count where that mean is 0 or not finite)."""
        (grad,) = torch.autograd.grad(losses.sum(), self.image, retain_graph=True)
        self._scale_from_gradient(grad)

    def _scale_from_gradient(self, grad: torch.Tensor) -> None:
        """``objective_scale`` from each image's loss gradient with respect to the parameter."""
        mean = grad.float().abs().flatten(1).mean(1)
        usable = torch.isfinite(mean) & (mean > 0)
        fallback = torch.full_like(mean, float(self.image[0].numel()))
        with torch.no_grad():
            self.objective_scale.copy_(torch.where(usable, 1.0 / torch.where(usable, mean, 1.0), fallback))
        self._scale_ready = True

    def starting_objective_scale(self) -> torch.Tensor:
        """The objective scale at the current images (one evaluation), as the first step would fix it."""
        with torch.enable_grad():
            if self.tile:
                self.prepare_targets()
                self._scale_from_gradient(self.tiled_terms(self.image.detach() / self.pixel_scale)[1] / self.pixel_scale)
            else:
                self._set_objective_scale(self.loss_terms()["loss"])
        return self.objective_scale.detach().clone()

    def use_objective_scale(self, scale: torch.Tensor) -> None:
        """Fix the objective scale instead of measuring it at the start: a warm start (a clip's frame begun from
        the previous result) sits near a minimum, and a scale measured there would make its steps far too big."""
        with torch.no_grad():
            self.objective_scale.copy_(scale.to(self.objective_scale.device).expand_as(self.objective_scale))
        self._scale_ready = True

    def evaluate(self) -> torch.Tensor:
        """One evaluation: loss terms, gradient of the objective, projected; the closure every optimiser calls.

        Static shapes, no host sync: non-finite losses are recorded in ``finite`` on the device. The first
        evaluation of a step records ``step_terms``.
        """
        self.image.grad = None
        if self.tile:
            terms, objective = self.tiled_objective()
        else:
            terms = self.loss_terms()
            objective = self.objective(terms)
            objective.backward()
        self.project_gradient()
        with torch.no_grad():
            self.finite &= torch.isfinite(terms["loss"])
            if self._first_evaluation:
                self.step_terms = torch.stack([terms[k].detach().mean() for k in LOSS_TERMS])
                self._first_evaluation = False
        return objective.detach()

    def tiled_objective(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``evaluate``'s loss terms and objective tile by tile, the objective's gradient left in ``image.grad``."""
        self.prepare_targets()
        terms, grad = self.tiled_terms(self.image.detach() / self.pixel_scale)
        grad = grad / self.pixel_scale
        if not self._scale_ready:
            self._scale_from_gradient(grad)
        self.image.grad = (grad * self.objective_scale.view(-1, 1, 1, 1)).to(self.image.dtype)
        return terms, (terms["loss"] * self.objective_scale).sum()

    @torch.no_grad()
    def project_gradient(self) -> None:
        """Pixels held at 0 or 255 are not pushed further out of range (a projected method with the clamp)."""
        grad = self.image.grad
        if grad is not None:
            x = self.image.detach()
            grad.masked_fill_(((x <= 0) & (grad > 0)) | ((x >= self.pixel_scale) & (grad < 0)), 0.0)

    @torch.no_grad()
    def clamp(self) -> None:
        """Keep the image in the valid pixel range after every update."""
        self.image.clamp_(0.0, self.pixel_scale)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One optimisation step (``optim.max_iter`` evaluations and updates), then, on logging steps only,
        the NaN guard and the logged losses: the only places values are read back from the device."""
        if not self.batch_size:
            return
        while True:
            self._first_evaluation = True
            try:
                self.optimizers().step(self.evaluate)
                break
            except BaseException as err:
                if self.recompute_more_blocks(err):
                    continue
                if not (isinstance(batch, GroupStep) and is_out_of_memory(err)):
                    raise
                self.ran_out_of_memory = True  # a folder run goes on with its next group
                return
        self._stepped = True
        with torch.no_grad():
            self.clamp()
            self.finite &= torch.isfinite(self.image).flatten(1).all(1)
            self.last_good.copy_(torch.where(self.finite.view(-1, 1, 1, 1), self.image, self.last_good))
        if self.average_decay is not None:
            self.update_average()
        if self.is_logging_step():
            self.check_finite()
            content, style, tv, total = self.step_terms
            self.log_dict({"content": content, "style": style, "tv": tv, "loss": total}, prog_bar=True,
                          on_step=True, on_epoch=False, batch_size=self.batch_size)

    def is_logging_step(self) -> bool:
        """Whether this step (just taken) is one the Trainer logs: every ``log_every_n_steps`` and the last."""
        trainer = self.trainer
        step = trainer.global_step
        return step % max(1, trainer.log_every_n_steps) == 0 or step == trainer.max_steps

    @torch.no_grad()
    def check_finite(self) -> None:
        """Read the NaN guard (a host sync): after a NaN or infinity, put back the last good images and raise."""
        if bool(self.finite.all()):
            return
        self.image.copy_(self.last_good)
        self.finite.fill_(True)
        raise NumericalError(self._numerical_advice())

    @torch.no_grad()
    def update_average(self) -> None:
        """One step of the bias-corrected exponential moving average of the image (crowsonkb's ``EMA``)."""
        decay = self.average_decay
        self.average_accum.mul_(decay)
        self.image_average.mul_(decay).add_(self.image.detach(), alpha=1.0 - decay)

    def optimised_image(self) -> torch.Tensor:
        """The images being optimised (their running average with ``optim.average``), ``[0, 1]``, on the CPU.

        Under ``color=luminance`` these are grey luminance images; ``result()`` adds the content's chroma.
        Reads the NaN guard first, so a non-finite image is never handed out (NumericalError instead).
        """
        self.check_finite()
        x = self.image.detach()
        if self.average_decay is not None:
            x = self.image_average / (1.0 - self.average_accum)
        return (x / self.pixel_scale).clamp(0.0, 1.0).cpu()

    def result(self) -> torch.Tensor:
        """The output images, ``(B, 3, H, W)`` in ``[0, 1]``, detached on the CPU, colour control applied."""
        x = self.optimised_image()
        if self.color == "luminance":
            x = colour.with_chroma(x, self.chroma_source.cpu())
        return x

    def setup(self, stage: str) -> None:
        """Run the frozen VGG as the Trainer's precision asks, on a converted copy: the shared extractor is never changed."""
        self.network = self.extractor.converted(self._network_dtype())

    def on_fit_start(self) -> None:
        if self.batch_size:
            self.prepare_targets()

    def configure_callbacks(self) -> list[L.Callback]:
        """cuDNN's algorithm search for CUDA runs (shapes are static), in whatever Trainer fits the module; a module
        without images (fed groups of pairs by ``StylePairsDataModule``) brings ``FolderGroups`` unless the Trainer
        has one."""
        own: list[L.Callback] = [CudnnBenchmark()]
        trainer = self._trainer
        if not self.batch_size and not any(isinstance(c, FolderGroups) for c in (trainer.callbacks if trainer else [])):
            own.append(FolderGroups())
        return own

    def train_dataloader(self) -> Iterator[int]:
        """The image is the only data: an endless stream of placeholders, stopped by ``max_steps``."""
        return itertools.repeat(0)

    def _numerical_advice(self) -> str:
        loss = self.loss_config
        return (
            f"the loss or the image became NaN or infinite by step {self.global_step}; lower optim.lr "
            f"(now {self.optim_config.learning_rate:g}) or the loss weights (content_weight {loss.content_weight:g}, "
            f"style_weight {loss.style_weight:g}, tv_weight {loss.tv_weight:g})"
        )

    # ----------------------------------------------------------------------------------- memory
    def recompute_more_blocks(self, err: BaseException) -> bool:
        """Memory planned by measurement: when the first step of an image runs out of memory and
        ``features.checkpoint_blocks`` is auto, recompute one more VGG block in the backward pass and say
        it will retry (the estimate that chose the blocks is calibrated on CPU; a GPU adds its context, cuDNN
        workspaces and fragmentation). Nothing of the failed step is kept: the image had not been updated."""
        if self._stepped or not self.grow_checkpoint_blocks or self.checkpoint_blocks >= MAX_CHECKPOINT_BLOCKS:
            return False
        if not is_out_of_memory(err):
            return False
        self.image.grad = None
        self.optimizers().optimizer.state.clear()
        if self.image.device.type == "cuda":
            torch.cuda.empty_cache()
        self.checkpoint_blocks += 1
        log.warning(
            "out of memory in the first step on %s: recomputing %d VGG block(s) in the backward pass "
            "(features.checkpoint_blocks) and trying again", self.image.device.type, self.checkpoint_blocks
        )
        return True

    def clear_images(self) -> None:
        """No images: the module waits for the next group of a folder run (its step does nothing meanwhile)."""
        self.image = nn.Parameter(self.image.new_zeros((0, 3, 1, 1)))
        if self.image.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep checkpoints small (the image, its average and optimiser state, not the frozen VGG) and good:
        the NaN guard is read first, so a non-finite state is never saved."""
        self.check_finite()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in CHECKPOINT_STATE}
        checkpoint[FINGERPRINT_KEY] = self.fingerprint

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The state a checkpoint keeps (``CHECKPOINT_STATE``), read after the NaN guard so it is never non-finite."""
        self.check_finite()
        return {k: v for k, v in self.state_dict().items() if k in CHECKPOINT_STATE}

    def restore_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put back what ``checkpoint_state`` returned (a folder group's checkpoint), the last good image with it."""
        self.load_state_dict(dict(state), strict=False)
        self._scale_ready = "objective_scale" in state
        self.last_good.copy_(self.image.detach())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint written by a run with other images, size, layers or weights.

        The configured learning rate replaces the saved one, so a run resumed after a NaN with a lower
        ``optim.lr`` really uses it.
        """
        self.check_checkpoint(checkpoint)
        self._scale_ready = "objective_scale" in checkpoint.get("state_dict", {})
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
        """Batched L-BFGS or Adam over the stacked images (``optim.max_iter`` updates per step, clamped after
        each, the step captured in a CUDA graph per ``optim.cuda_graph``); torch's L-BFGS for ``line_search:
        strong_wolfe`` (one image, clamped after the step, always eager)."""
        cfg = self.optim_config
        if cfg.line_search == "strong_wolfe":
            return torch.optim.LBFGS(
                [self.image],
                lr=cfg.learning_rate,
                max_iter=cfg.max_iter,
                history_size=cfg.history_size,
                line_search_fn=cfg.line_search,
                tolerance_grad=0.0,
                tolerance_change=0.0,
            )
        common = {"lr": cfg.learning_rate, "max_iter": cfg.max_iter, "after_update": self.clamp, "graph": self.step_graph()}
        if cfg.name == "adam":
            return BatchedAdam([self.image], **common)
        return BatchedLBFGS([self.image], history_size=cfg.history_size, skip_first_pair=self._network_dtype() != torch.float32, **common)

    def _network_dtype(self) -> torch.dtype:
        """The dtype the attached Trainer's precision runs the network in (fp32 without a Trainer)."""
        return network_dtype(str(self.trainer.precision) if self._trainer is not None else "32-true")

    def step_graph(self) -> StepGraph | None:
        """The CUDA graph of the step under ``optim.cuda_graph``: ``auto`` on CUDA (not for the ``w2`` style loss,
        whose eigenvalue solver reads its status on the host, nor for a tiled evaluation), ``true`` anywhere (off
        CUDA its code path runs eagerly, which is how CPU tests check it), ``false`` never."""
        setting = self.optim_config.cuda_graph
        eager = self.image.device.type != "cuda" or self.loss_config.style_loss == "w2" or bool(self.tile)
        if setting is False or (setting == "auto" and eager):
            return None
        return StepGraph()




def _styles_per_image(
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
