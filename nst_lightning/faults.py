"""Keeping a run's work when it stops early: atomic checkpoints, Ctrl-C and SIGTERM, failures mid-run.

``GracefulStop`` turns the first SIGINT or SIGTERM into a stop at the end of the current step, where the
image and the optimiser agree, and saves ``last.ckpt`` and the image there. A second signal stops at once.
Any other failure saves the image only: a checkpoint of a failed state (NaN, half a step) must not
replace the last good one.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .atomic import atomic_write
from .images import save_image

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


class StopSignal(KeyboardInterrupt):
    """SIGINT or SIGTERM outside an optimisation step (loading, saving a frame, between frames, stages or cells): the
    run stops where it is, which loses nothing since every file is written whole or not at all."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def routing_signals(handler: Callable[[int, FrameType | None], Any]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``handler`` while the block runs (main thread only: elsewhere Python cannot set
    handlers), then put back the handlers they had."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def stopping_on_signals() -> AbstractContextManager[None]:
    """While the block runs, SIGINT and SIGTERM raise ``StopSignal`` wherever the run is; a fit routes them to its
    ``GracefulStop`` instead, and puts this back after. Without it SIGTERM outside a fit would end the process with
    no word and no clean-up."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise StopSignal(signum)

    return routing_signals(stop)


class _StopRequested(Exception):
    """Raised at the end of a step after a stop signal, so Lightning unwinds through ``on_exception``."""


class GracefulStop(Callback):
    """Stop cleanly on SIGINT or SIGTERM, and save what is safe to save when a run fails.

    Use ``with stop.handling_signals(): trainer.fit(...)``; after an early stop, ``signum``, ``at_once``,
    ``step`` and ``saved`` say what happened and what was written.
    """

    def __init__(self, checkpoint_path: str | Path, image_path: str | Path | None) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.image_path = None if image_path is None else Path(image_path)
        self.signum: int | None = None
        self.at_once = False
        self.started = False
        self.step: int | None = None
        self.saved: list[Path] = []
        self._announce = False

    def handling_signals(self) -> AbstractContextManager[None]:
        """Route SIGINT and SIGTERM to this callback while the block runs (main thread only), then restore."""
        return routing_signals(self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self.at_once = True
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: stopping after the current step "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.started = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop at the end of the step after a signal. With several ranks, rank zero decides for all of them, at the
        same step: it sets Lightning's ``received_sigterm`` (Lightning then raises ``SIGTERMException`` at the end
        of this step) and ``on_exception`` answers the broadcast the other ranks are waiting in at their next step;
        a signal that reaches another rank only is noted (its exit code) and waits for rank zero's decision."""
        if self.signum is None:
            return
        if trainer.world_size == 1:
            raise _StopRequested
        if trainer.is_global_zero and not trainer.received_sigterm:
            trainer.received_sigterm = True
            self._announce = True

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        """Save the image if training had started and it is finite; after a requested stop (a step boundary)
        save the checkpoint too. Before training starts a resumed image is not restored yet: nothing is saved."""
        self.step = trainer.global_step
        if isinstance(exception, SIGTERMException) and self.signum is None:
            self.signum = signal.SIGTERM  # told to stop by rank zero
        if self._announce:
            self._announce = False
            _tell_other_ranks_to_stop(trainer)
        if not self.started:
            return
        try:
            if self.image_path is not None and trainer.is_global_zero:
                image = pl_module.result()
                if bool(torch.isfinite(image).all()):
                    save_image(image, self.image_path)
                    self.saved.append(self.image_path)
            if isinstance(exception, (_StopRequested, SIGTERMException)):
                saved = self.save_state(trainer, pl_module)
                if saved is not None:
                    self.saved.append(saved)
        except OSError:  # e.g. the disk that failed the run is still full: report the first problem, not this one
            pass

    def save_state(self, trainer: L.Trainer, pl_module: Any) -> Path | None:
        """Save what a resume needs at a step boundary; returns the file written."""
        trainer.save_checkpoint(self.checkpoint_path)
        return self.checkpoint_path

    @property
    def stopped_by_signal(self) -> bool:
        """Whether a stop signal ended the run."""
        return self.signum is not None

    @staticmethod
    def is_stop(exception: BaseException) -> bool:
        """Whether ``exception`` is how Lightning or this callback unwinds a stopped run."""
        return isinstance(exception, (_StopRequested, SystemExit, KeyboardInterrupt))


def _tell_other_ranks_to_stop(trainer: L.Trainer) -> None:
    """Rank zero's half of Lightning's per-step stop broadcast (``_broadcast_sigterm_tensor``): the flag, set, then
    the barrier every rank passes before it raises ``SIGTERMException``, so all ranks stop after the same step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.broadcast(torch.tensor([1], device=trainer.strategy.root_device), src=0)
    dist.barrier()
