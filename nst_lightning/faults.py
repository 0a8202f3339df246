"""Keeping a run's work when it stops early: atomic checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that are atomic on local disk: a temporary file beside the target, fsync, rename.

    Lightning's default goes through an fsspec transaction, whose local temporary file is made in
    ``$TMPDIR`` and moved into place: a copy (not atomic) when ``$TMPDIR`` is another filesystem, and a
    stray file there after a kill. Remote URLs keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda fh: torch.save(checkpoint, fh), fsync=True)
