"""The guards of a run's step: the NaN guard (a non-finite loss or image puts back the last good images and
stops with advice) and the out-of-memory retry (one more VGG block recomputed on the first step). A mixin of
``StyleTransferModule``, which supplies ``image``, ``finite``, ``last_good`` and the settings.
"""

from __future__ import annotations

import logging

import torch

from .errors import NumericalError
from .resources import is_out_of_memory
from .sections import MAX_CHECKPOINT_BLOCKS

log = logging.getLogger(__name__)


class StepGuards:
    """``check_finite`` (read on logging steps and before any image is handed out) and ``recompute_more_blocks``."""

    @torch.no_grad()
    def check_finite(self) -> None:
        """Read the NaN guard (a host sync): after a NaN or infinity, put back the last good images and raise."""
        if bool(self.finite.all()):
            return
        self.image.copy_(self.last_good)
        self.finite.fill_(True)
        raise NumericalError(self._numerical_advice())

    def _numerical_advice(self) -> str:
        loss = self.loss_config
        return (
            f"the loss or the image became NaN or infinite by step {self.global_step}; lower optim.lr "
            f"(now {self.optim_config.learning_rate:g}) or the loss weights (content_weight {loss.content_weight:g}, "
            f"style_weight {loss.style_weight:g}, tv_weight {loss.tv_weight:g})"
        )

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
