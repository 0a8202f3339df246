"""The LightningModule and the one optimisation engine of every run: the output images are its only parameter.

Single runs, coarse-to-fine stages, sweep cells and folder runs all train this module with ``Trainer.fit``.
Works in any ``lightning.Trainer`` (the CLI's or the user's): it brings its own trivial dataloader (or
takes groups of pairs from ``StylePairsDataModule``), keeps the images in ``[0, 1]`` after every update,
reads nothing back from the device between logging steps and refuses checkpoints of other runs. The
step is ``training_step``: ``optimizer.step(self.evaluate)``, the package's only call of an optimiser.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from . import color as colour
from .callbacks import CudnnBenchmark
from .checkpointing import CheckpointHooks
from .config import INIT_KEYWORDS, FeaturesConfig, LossConfig, OptimConfig
from .cudagraph import StepGraph
from .data import GroupStep
from .errors import ConfigError
from .features import VGGFeatures, extractor_for, min_side
from .groups import FolderGroups
from .guards import StepGuards
from .history import LOSS_TERMS
from .images import load_image, read_image
from .layers import LAYER_NAMES, deepest
from .losses import StyleTransferLoss, TemporalTarget
from .objective import ScaledObjective
from .optim import build_optimizer
from .problem import ImageInput, as_mask, describe, initial_image, load_inputs, styles_per_image
from .resources import is_out_of_memory
from .targets import TargetHooks
from .tiling import TILED_STYLE_LOSSES, tiled_terms


def network_dtype(precision: str) -> torch.dtype:
    """The dtype the frozen VGG runs in under a Trainer ``precision``: bf16 for bf16 precisions, else fp32."""
    return torch.bfloat16 if precision.startswith("bf16") else torch.float32


class StyleTransferModule(CheckpointHooks, TargetHooks, ScaledObjective, StepGuards, L.LightningModule):
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
                "content": describe(content),
                "style": describe(style),
                "size": size,
                "style_scale": style_scale,
                "loss": self.loss_config.model_dump(),
                "optim": self.optim_config.model_dump(),
                "features": self.features_config.model_dump(),
                "init": describe(init),
                "style_blend": list(style_blend) if style_blend is not None else None,
                "color": color,
                "style_masks": None if style_masks is None else [describe(m) for m in style_masks],
                "seed": seed,
                "image_shape": None,
            }
        )
        content, style = load_inputs(content, style, size, style_scale)
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
        per_image = styles_per_image(style, content.shape[0])
        self.check_sizes(content, [s for styles in per_image for s in styles])
        masks = self.raw_style_masks
        if masks is not None and any(len(masks) != len(styles) for styles in per_image):
            raise ConfigError(f"{len(masks)} style masks for {len(per_image[0])} style images; give one (or None) per style")
        device = self.image.device
        content = content.detach().float()
        self.style_masks = None if masks is None else [
            None if m is None else self.with_margin(as_mask(m, content.shape[-2:])) for m in masks
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
        self.fingerprint = self.make_fingerprint(content, per_image)
        self.hparams["image_shape"] = list(content.shape)
        self.step_terms = None
        self._stepped = False

    def with_margin(self, image: torch.Tensor) -> torch.Tensor:
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
        feats = self.network(self.with_margin(x), checkpoint_blocks=self.checkpoint_blocks)
        per_image = [
            criterion({k: v[i : i + 1] for k, v in feats.items()}, x[i : i + 1]) for i, criterion in enumerate(self.criteria)
        ]
        return {k: torch.stack([t[k] for t in per_image]) for k in LOSS_TERMS}

    def tiled_terms(self, image: torch.Tensor, gradient: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The loss terms at ``image`` (``[0, 1]``) and, with ``gradient``, their summed gradient, tile by tile."""
        return tiled_terms(self.network, self.criteria, image, self.tile, self.with_margin, gradient=gradient)

    # ----------------------------------------------------------------------------------- the step
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
            content, style, smoothness, total = self.step_terms
            self.log_dict({"content": content, "style": style, "smoothness": smoothness, "loss": total}, prog_bar=True,
                          on_step=True, on_epoch=False, batch_size=self.batch_size)

    def is_logging_step(self) -> bool:
        """Whether this step (just taken) is one the Trainer logs: every ``log_every_n_steps`` and the last."""
        trainer = self.trainer
        step = trainer.global_step
        return step % max(1, trainer.log_every_n_steps) == 0 or step == trainer.max_steps

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

    def clear_images(self) -> None:
        """No images: the module waits for the next group of a folder run (its step does nothing meanwhile)."""
        self.image = nn.Parameter(self.image.new_zeros((0, 3, 1, 1)))
        if self.image.device.type == "cuda":
            torch.cuda.empty_cache()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimiser ``optim`` names over the stacked images (``optim.build_optimizer``), clamped after each
        update, the step captured in a CUDA graph per ``optim.cuda_graph``."""
        skip = self._network_dtype() != torch.float32
        return build_optimizer(self.optim_config, self.image, self.clamp, self.step_graph(), skip_first_pair=skip)

    def _network_dtype(self) -> torch.dtype:
        """The dtype the attached Trainer's precision runs the network in (fp32 without a Trainer)."""
        return network_dtype(str(self.trainer.precision) if self._trainer is not None else "32-true")

    def step_graph(self) -> StepGraph | None:
        """The CUDA graph of the step under ``optim.cuda_graph``: ``auto`` on CUDA (not for the ``w2`` style loss,
        whose eigenvalue solver reads its status on the host; a tiled step is a fixed sequence of tile passes and
        is captured like a whole one), ``true`` anywhere (off CUDA its code path runs eagerly, which is how CPU
        tests check it), ``false`` never."""
        setting = self.optim_config.cuda_graph
        eager = self.image.device.type != "cuda" or self.loss_config.style_loss == "w2"
        if setting is False or (setting == "auto" and eager):
            return None
        return StepGraph()
