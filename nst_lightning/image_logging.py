"""Progress pictures for the user's own Lightning loggers: whichever is attached, in the way it takes images.

TensorBoard gets ``add_image``, MLflow ``log_image`` (an artifact per picture), Weights & Biases
``log_image``; any other logger with a folder (``CSVLogger``, ...) gets PNG files in ``LOG_DIR/images/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from .images import save_pil, to_pil
from .history import LOSS_TERMS
from .plots import loss_curve_picture, side_by_side_picture


def log_picture(logger: Logger, tag: str, picture: Image.Image, step: int) -> None:
    """Hand one RGB picture to ``logger`` as it takes images; a logger without an image API and without a
    folder gets nothing."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, np.asarray(picture), global_step=step, dataformats="HWC")
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, picture, artifact_file=f"{tag}/step_{step:06d}.png")
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[picture], step=step)
    else:
        folder = getattr(logger, "log_dir", None) or logger.save_dir
        if folder is not None:
            save_pil(picture, Path(folder) / "images" / f"{tag}_step_{step:06d}.png")


class ImageLogger(Callback):
    """Log the current image every ``every_n_steps`` steps and at the end, and at the end the side-by-side
    picture (content | style | result) and the loss curve, to every logger of the Trainer (rank zero only).

    A batch of images is logged as one row. The loss curve is drawn from each step's loss terms, kept as
    device tensors until the end (no host sync per step); the side-by-side picture is for single runs (B = 1).
    Tags: ``tag`` for the image, ``side_by_side`` and ``loss_curve``.
    """

    def __init__(self, every_n_steps: int = 50, tag: str = "image", side_by_side: bool = True, loss_curve: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be at least 1")
        self.every_n_steps = every_n_steps
        self.tag = tag
        self.side_by_side = side_by_side
        self.loss_curve = loss_curve
        self._last_logged = -1
        self._terms: list[tuple[int, torch.Tensor]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._terms = []
        self._last_logged = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not pl_module.batch_size:
            return
        if self.loss_curve and pl_module.step_terms is not None:
            self._terms.append((trainer.global_step - 1, pl_module.step_terms.detach().clone()))
        if trainer.global_step % self.every_n_steps == 0:
            self.log_image(trainer, pl_module.result(), trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not pl_module.batch_size:  # a folder run: its groups are written and gone
            return
        step, result = trainer.global_step, pl_module.result()
        if step != self._last_logged:
            self.log_image(trainer, result, step)
        if not trainer.is_global_zero:
            return
        if self.side_by_side and result.shape[0] == 1:
            styles = [s.cpu() for s in pl_module.style_images[0]]
            picture = side_by_side_picture(pl_module.content_image[:1].cpu(), styles, result)
            self._log(trainer, "side_by_side", picture, step)
        if self.loss_curve and self._terms:
            with torch.no_grad():
                final = torch.stack([pl_module.loss_terms()[k].mean() for k in LOSS_TERMS])
            rows = [(s, t.tolist()) for s, t in [*self._terms, (step, final)]]
            data = {"step": [float(s) for s, _ in rows], **{k: [v[i] for _, v in rows] for i, k in enumerate(LOSS_TERMS)}}
            self._log(trainer, "loss_curve", loss_curve_picture(data), step)

    def log_image(self, trainer: L.Trainer, image: torch.Tensor, step: int) -> None:
        """Send ``(B, 3, H, W)`` ``[0, 1]`` images (in one row) to every logger of ``trainer`` (rank zero only)."""
        if trainer.is_global_zero:
            row = torch.cat(list(image.detach().float().cpu().clamp(0, 1)), dim=-1)
            self._log(trainer, self.tag, to_pil(row), step)
        self._last_logged = step

    def _log(self, trainer: L.Trainer, tag: str, picture: Image.Image, step: int) -> None:
        for logger in trainer.loggers:
            log_picture(logger, tag, picture, step)
