"""Lightning callbacks that write what people look at: snapshots, the final image, the loss history, plots.

Each works with any Trainer holding a ``StyleTransferModule``; files are written by rank zero only.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from collections.abc import Sequence
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar

from .atomic import write_text_atomic
from .history import LOSS_COLUMNS, LOSS_TERMS, keep_damaged, read_history
from .images import save_image

log = logging.getLogger(__name__)


def run_dir(trainer: L.Trainer) -> Path:
    """Where a callback writes when given no path: the first logger's folder, else the Trainer's ``default_root_dir``."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def save_images(images: torch.Tensor, path: Path) -> None:
    """Write ``(B, 3, H, W)`` images: one to ``path``, several as ``path`` with ``_0``, ``_1``, ... before the suffix."""
    if images.shape[0] == 1:
        save_image(images, path)
        return
    for i, image in enumerate(images):
        save_image(image.unsqueeze(0), path.with_name(f"{path.stem}_{i}{path.suffix}"))


class ImageSnapshots(Callback):
    """Save the current image as ``DIR/step_000050.png`` every ``every_n_steps`` steps (0: never).

    ``dirpath`` defaults to ``snapshots/`` in the Trainer's log folder (``trainer.log_dir``, else its
    ``default_root_dir``), so the callback works in any Trainer. ``step_offset`` counts the steps of earlier
    coarse-to-fine stages, so names and cadence run on.
    """

    def __init__(self, dirpath: str | os.PathLike[str] | None = None, every_n_steps: int = 50, step_offset: int = 0) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be 0 (never) or more, got {every_n_steps}")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.every_n_steps = every_n_steps
        self.step_offset = step_offset

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.step_offset + trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and pl_module.batch_size:
            where = self.dirpath or run_dir(trainer) / "snapshots"
            if trainer.is_global_zero:
                save_images(pl_module.result(), where / f"step_{step:06d}.png")


class FinalImage(Callback):
    """Save the result to ``path`` when training ends (max_steps reached or stopped).

    ``path`` defaults to ``final.png`` in the Trainer's log folder (``trainer.log_dir``, else its
    ``default_root_dir``); a batch of B images is written as ``final_0.png`` ... ``final_{B-1}.png``.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not pl_module.batch_size:  # a folder run writes each pair's file itself
            return
        where = self.path or run_dir(trainer) / "final.png"
        if trainer.is_global_zero:
            save_images(pl_module.result(), where)


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also refreshes ``last.ckpt`` at the final step, whatever ``every_n_train_steps``."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Lightning's save, without its warning that a checkpoint of manual optimisation holds the state after the
        step: that is where a resume continues, on purpose (the filter holds only during this call)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class LossHistory(Callback):
    """Keep every step's loss terms in a CSV file that survives resumes (rows from the resume point on are redone).

    Row ``s`` holds the loss at the image after ``s`` steps: row 0 is the starting image, each step's row
    comes from the step's first evaluation, and the last row from one evaluation of the final image. Values
    stay device tensors until the file is rewritten (on logging steps, with every checkpoint, and when the
    run ends or fails), so a GPU run is not synchronised on every step. ``step_offset`` counts the steps of
    earlier coarse-to-fine stages, so one file spans the whole run (a stage's first row replaces the
    previous stage's last: the same step, measured at the new scale).
    """

    def __init__(self, path: str | os.PathLike[str], step_offset: int = 0) -> None:
        self.path = Path(path)
        self.step_offset = step_offset
        self.rows: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Continue the history on disk: every valid row before the resume point; damaged lines are reported
        and the damaged file is kept aside (rank zero), never cut away unseen."""
        history = read_history(self.path)
        if history.dropped and trainer.is_global_zero:
            log.warning("%s; the damaged file is kept as %s", history.describe(), keep_damaged(history))
        self.rows = [r for r in history.rows if r["step"] < self.step_offset + trainer.global_step]

    def _append(self, step: int, terms: torch.Tensor | None) -> None:
        if terms is not None:
            self.rows.append({"step": self.step_offset + step, "terms": terms.detach().clone()})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._append(trainer.global_step - 1, pl_module.step_terms)
        if pl_module.is_logging_step():
            self.flush(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        with torch.no_grad():
            terms = pl_module.loss_terms()
        self._append(trainer.global_step, torch.stack([terms[k].mean() for k in LOSS_TERMS]))
        self.flush(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Write the rows with every checkpoint, so a resume after a kill finds the history up to its step."""
        self.flush(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        try:
            self.flush(trainer)
        except OSError:  # the failure may be a full disk: keep the file as last written and let it be reported
            pass

    def flush(self, trainer: L.Trainer) -> None:
        """Rewrite the CSV atomically with every row so far (reading the device values: a host sync)."""
        if not trainer.is_global_zero:
            return
        rows = []
        for row in self.rows:
            if "terms" in row:
                row = {"step": row["step"], **dict(zip(LOSS_TERMS, row["terms"].tolist()))}
            rows.append(row)
        self.rows = rows
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LOSS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (int(v) if k == "step" else f"{v:.6g}") for k, v in row.items()})
        write_text_atomic(self.path, buf.getvalue())


class RunResult(Callback):
    """Keep what a run ends with in memory: its result image (``result()``, on the CPU) and the loss terms of
    the final row of its ``LossHistory`` (which must come before this callback), for a caller that collects many
    runs (a sweep) without reading their files back."""

    def __init__(self) -> None:
        self.image: torch.Tensor | None = None
        self.terms: dict[str, float] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.image = pl_module.result()
        history = next((c for c in trainer.callbacks if isinstance(c, LossHistory)), None)
        last = history.rows[-1] if history is not None and history.rows else {}
        self.terms = {k: float(last[k]) for k in LOSS_TERMS if k in last}


class RunPlots(Callback):
    """At the end of training draw the loss curve (from the ``losses`` CSV) and the side-by-side picture.

    Place it after ``LossHistory`` so the CSV is complete; ``content`` and ``styles`` are shown as given
    (the originals, before any colour control).
    """

    def __init__(
        self,
        losses: str | os.PathLike[str],
        curve: str | os.PathLike[str],
        picture: str | os.PathLike[str],
        content: torch.Tensor,
        styles: Sequence[torch.Tensor],
        stage_starts: Sequence[int] = (),
    ) -> None:
        self.losses = Path(losses)
        self.curve = Path(curve)
        self.picture = Path(picture)
        self.content = content
        self.styles = list(styles)
        self.stage_starts = list(stage_starts)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        from .plots import loss_curve, side_by_side

        if self.losses.is_file():
            loss_curve(self.losses, self.curve, self.stage_starts)
        side_by_side(self.content, self.styles, pl_module.result(), self.picture)


class StepProgressBar(ProgressBar):
    """One progress line per run on stderr: steps done of ``max_steps``, seconds per step and the total loss.

    On a terminal it is a tqdm bar redrawn in place (``Stylising: 40%|████  | 120/300 [00:50<01:16, 0.42s/it,
    loss=5.68e-1]``); elsewhere (a log file, CI) a plain line every few steps and at the end, so logs hold no
    ``\r`` redraws. The loss is read only on the Trainer's logging steps (``log_every_n_steps``), so the bar
    adds no device synchronisation to the steps between them.
    """

    def __init__(self, description: str = "Stylising", stream: TextIO | None = None) -> None:
        super().__init__()
        self.description = description
        self.stream = stream
        self._enabled = True
        self._bar: Any = None
        self._start = (0, 0.0)
        self._loss = ""
        self._line_every = 1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        total = trainer.max_steps
        self._start = (trainer.global_step, time.perf_counter())
        self._loss = ""
        if self._out.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=trainer.global_step, desc=self.description, file=self._out,
                dynamic_ncols=True, unit="step", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_inv_fmt}{postfix}]",
            )
        else:
            every = max(1, trainer.log_every_n_steps)
            self._line_every = every * max(1, -(-total // (20 * every)))  # about 20 lines, on logging steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        step = trainer.global_step
        if step % max(1, trainer.log_every_n_steps) == 0 or step == trainer.max_steps:
            loss = trainer.callback_metrics.get("loss")
            if loss is not None:
                self._loss = f"loss={float(loss):.2e}"
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(self._loss, refresh=False)
            self._bar.refresh()
        elif step % self._line_every == 0 or step == trainer.max_steps:
            self._print_line(step, trainer.max_steps)

    def _print_line(self, step: int, total: int) -> None:
        first, started = self._start
        rate = (time.perf_counter() - started) / max(1, step - first)
        parts = [f"{self.description}: step {step}/{total} ({100 * step // max(1, total)}%)", f"{rate:.2f} s/step"]
        print(", ".join([*parts, *([self._loss] if self._loss else [])]), file=self._out, flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)


class CudnnBenchmark(Callback):
    """On a CUDA run, cuDNN times its convolution algorithms once and keeps the fastest: a run's shapes never
    change within a fit, so the search pays for itself. The process's previous setting is back after the fit,
    also when it fails. Every ``StyleTransferModule`` brings one (``configure_callbacks``)."""

    def __init__(self) -> None:
        self.previous: bool | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type == "cuda" and self.previous is None:
            self.previous = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.restore()

    def restore(self) -> None:
        if self.previous is not None:
            torch.backends.cudnn.benchmark = self.previous
            self.previous = None
