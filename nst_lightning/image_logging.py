"""Progress images for the user's own loggers: TensorBoard when installed, else PNG files in the logger's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from .images import save_image


class ImageLogger(Callback):
    """Log the current image (``pl_module.result()``) every ``every_n_steps`` training steps and at the end.

    A ``TensorBoardLogger`` gets ``add_image(tag, image, step)`` (needs the ``tensorboard`` extra); any other
    logger with a folder (``CSVLogger``, ...) gets ``LOG_DIR/images/<tag>_step_000050.png``. Rank zero only.
    """

    def __init__(self, every_n_steps: int = 50, tag: str = "image") -> None:
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be at least 1")
        self.every_n_steps = every_n_steps
        self.tag = tag
        self._last_logged = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.log_image(trainer, pl_module.result(), trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_step != self._last_logged:
            self.log_image(trainer, pl_module.result(), trainer.global_step)

    def log_image(self, trainer: L.Trainer, image: torch.Tensor, step: int) -> None:
        """Send a ``(1, 3, H, W)`` ``[0, 1]`` image to every logger of ``trainer`` (rank zero only)."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.tag, image[0].clamp(0, 1), global_step=step)
            elif logger.log_dir is not None:
                save_image(image, Path(logger.log_dir) / "images" / f"{self.tag}_step_{step:06d}.png")
        self._last_logged = step
