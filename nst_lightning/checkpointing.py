"""What a checkpoint of ``StyleTransferModule`` holds and how it is checked: the images and their state (never the
frozen VGG), the run's fingerprint, and the refusal of another run's checkpoint. A mixin of the module's
Lightning hooks, so the module file holds the problem and the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .groups import FINGERPRINT_KEY
from .problem import check_fingerprint, digest

CHECKPOINT_STATE = ("image", "objective_scale", "image_average", "average_accum")
"""The module state a checkpoint keeps: the image, the objective's scale and, with iterate averaging, its
running average."""


class CheckpointHooks:
    """The checkpoint hooks of ``StyleTransferModule`` (which supplies ``check_finite``, ``fingerprint``,
    ``optim_config``, ``image``, ``last_good`` and the state-dict methods)."""

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

    def make_fingerprint(self, content: torch.Tensor, per_image: list[list[torch.Tensor]]) -> dict[str, Any]:
        """What a checkpoint of this problem must match to resume it: the images (as digests), masks, colour mode,
        shape, layers, network and optimiser."""
        fingerprint = {
            "content": digest(content),
            "styles": [digest(s) for s in per_image[0]] if len(per_image) == 1 else [[digest(s) for s in st] for st in per_image],
            "style_blend": self.style_blend,
            "style_masks": None if self.style_masks is None else [m if m is None else digest(m) for m in self.style_masks],
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
            fingerprint["temporal"] = [digest(t.image), digest(t.weights), float(t.weight)]
        return fingerprint

    def check_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Raise CheckpointError unless ``checkpoint`` was written by a run of this module's images and settings."""
        check_fingerprint(self.fingerprint, checkpoint)
