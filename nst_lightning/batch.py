"""Batch runs: many content x style pairs, several images per device, sharded over devices and nodes.

``BatchStylizer`` optimises one group of pairs per ``predict_step`` and writes one file per pair. Lightning's
launcher (``devices``, ``num_nodes``, ``strategy``; SLURM and torchrun detected) runs it on every rank and its
predict sampler gives each rank its own groups: nothing is averaged or broadcast between ranks. ``fit_batch``
assembles it from a config and ends with a summary of what every rank produced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm

from .api import init_input
from .atomic import check_writable, write_text_atomic
from .config import FeaturesConfig, LossConfig, OptimConfig, RunConfig, dump_config
from .data import PairItem, StylePairsDataModule
from .errors import ConfigError, NSTError
from .features import VGGFeatures
from .hardware import resolve_precision
from .images import save_image
from .module import StyleTransferModule, config_extractor, network_dtype
from .pairs import Pair, expand_pairs, pending

SUMMARY_FILE = "batch-summary.json"

StepHook = Callable[[int, list[float]], None]
"""Called after every optimiser step of a group with the step number and each image's loss."""


def lockstep_ok(optim: OptimConfig) -> bool:
    """Whether images can share one forward pass and still be optimised independently.

    True when every optimiser step evaluates the loss exactly once (Adam; L-BFGS with ``max_iter: 1`` and
    no line search): each image then keeps its own optimiser and history, fed from the shared pass.
    """
    return optim.name == "adam" or (optim.max_iter == 1 and optim.line_search == "none")


@dataclass
class PairResult:
    """What became of one pair on one rank: ``done`` (file written) or ``failed`` (with the reason)."""

    name: str
    content: str
    styles: list[str]
    output: str
    rank: int
    status: str
    error: str | None = None
    loss: float | None = None
    seconds: float = 0.0


class BatchStylizer(L.LightningModule):
    """Optimises groups of content x style pairs in ``predict_step`` and writes each result to its pair's file.

    Run it with ``trainer.predict(stylizer, datamodule=StylePairsDataModule(...), return_predictions=False)``
    on a Trainer made with ``inference_mode=False``. Each image has its own optimiser, exactly as a single
    run's ``StyleTransferModule``; same-size images share the VGG forward and backward pass when
    ``lockstep_ok``. Callbacks may define ``on_optim_step(trainer, module, step, losses)`` to follow steps.

    Args:
        steps: optimiser steps per image.
        loss, optim, features, init, seed: as for ``StyleTransferModule``; ``init`` may be an image tensor.
        extractor: a prebuilt ``VGGFeatures``; built from ``features`` otherwise.
    """

    def __init__(
        self,
        *,
        steps: int = 300,
        loss: LossConfig | Mapping[str, Any] | None = None,
        optim: OptimConfig | Mapping[str, Any] | None = None,
        features: FeaturesConfig | Mapping[str, Any] | None = None,
        init: str | torch.Tensor = "content",
        seed: int = 0,
        extractor: VGGFeatures | None = None,
    ) -> None:
        super().__init__()
        self.steps = steps
        self.loss_config = LossConfig.model_validate(loss or {})
        self.optim_config = OptimConfig.model_validate(optim or {})
        self.features_config = FeaturesConfig.model_validate(features or {})
        self.init = init
        self.seed = seed
        self.extractor = extractor if extractor is not None else config_extractor(
            self.features_config, [*self.loss_config.content_layers, *self.loss_config.style_layers]
        )
        self.results: list[PairResult] = []

    def setup(self, stage: str) -> None:
        """Match the frozen VGG to the Trainer's precision, as StyleTransferModule does."""
        self.extractor.optimize(network_dtype(str(self.trainer.precision)))

    def problem(self, content: torch.Tensor, styles: Sequence[torch.Tensor]) -> StyleTransferModule:
        """One image's optimisation problem on this module's device, its targets computed in fp32."""
        module = StyleTransferModule(
            content,
            list(styles),
            loss=self.loss_config,
            optim=self.optim_config,
            features=self.features_config,
            init=self.init,
            extractor=self.extractor,
            seed=self.seed,
        ).to(self.device)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            module.prepare_targets()
        return module

    def optimize(self, problems: Sequence[StyleTransferModule], on_step: StepHook | None = None) -> list[float]:
        """Run ``steps`` optimiser steps on same-size ``problems``; returns each one's loss at the last step."""
        if len(problems) > 1 and not lockstep_ok(self.optim_config):
            raise ValueError("several images share a step only with adam or lbfgs with max_iter 1 and no line search")
        optimizers = [p.configure_optimizers() for p in problems]
        losses: list[float] = []
        with torch.enable_grad():
            for step in range(1, self.steps + 1):
                if len(problems) == 1:
                    losses = [float(optimizers[0].step(lambda: self._evaluate(problems)[0]))]
                else:
                    shared = self._evaluate(problems)
                    for optimizer, loss in zip(optimizers, shared):
                        optimizer.step(lambda loss=loss: loss)
                    losses = [float(loss) for loss in shared]
                with torch.no_grad():
                    for p in problems:
                        p.image.clamp_(0.0, p.pixel_scale)
                if on_step is not None:
                    on_step(step, losses)
        return losses

    def _evaluate(self, problems: Sequence[StyleTransferModule]) -> list[torch.Tensor]:
        """One batched VGG pass; each image's loss against its own targets; gradients set and projected."""
        for p in problems:
            p.image.grad = None
        x = torch.cat([p.image for p in problems]) / StyleTransferModule.pixel_scale
        feats = self.extractor(x)
        losses = [
            p.objective(p.criterion({k: v[i : i + 1] for k, v in feats.items()}, x[i : i + 1]))
            for i, p in enumerate(problems)
        ]
        torch.stack(losses).sum().backward()
        for p in problems:
            p.on_after_backward()
        return [loss.detach() for loss in losses]

    def on_predict_start(self) -> None:
        self.results = []

    def predict_step(self, batch: list[PairItem], batch_idx: int) -> list[PairResult]:
        """Optimise the group's pairs (batched by size) and write their files; failed loads are recorded."""
        results: list[PairResult] = []
        by_shape: dict[tuple[int, ...], list[tuple[Pair, StyleTransferModule]]] = {}
        for item in batch:
            if item.error is not None:
                results.append(self._result(item.pair, "failed", error=item.error))
                continue
            try:
                problem = self.problem(item.content, item.styles)
            except NSTError as err:
                results.append(self._result(item.pair, "failed", error=str(err)))
                continue
            by_shape.setdefault(tuple(problem.image.shape), []).append((item.pair, problem))
        for members in by_shape.values():
            start = time.perf_counter()
            losses = self.optimize([p for _, p in members], on_step=self._notify_callbacks)
            seconds = (time.perf_counter() - start) / len(members)
            for (pair, problem), loss in zip(members, losses):
                save_image(problem.result(), pair.output)
                results.append(self._result(pair, "done", loss=loss, seconds=seconds))
        self.results.extend(results)
        return results

    def _result(self, pair: Pair, status: str, **details: Any) -> PairResult:
        return PairResult(pair.name, pair.content, list(pair.styles), pair.output, self.global_rank, status, **details)

    def _notify_callbacks(self, step: int, losses: list[float]) -> None:
        for callback in self.trainer.callbacks:
            hook = getattr(callback, "on_optim_step", None)
            if callable(hook):
                hook(self.trainer, self, step, losses)


class BatchProgressBar(Callback):
    """Two bars on rank zero: images done (of this rank's share) and the current group's steps."""

    def __init__(self) -> None:
        self.images: tqdm | None = None
        self.steps: tqdm | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        loader = trainer.predict_dataloaders
        dataset = getattr(loader, "dataset", None)
        total = sum(dataset.group_size(i) for i in loader.sampler) if hasattr(dataset, "group_size") else None
        label = "images" if trainer.world_size == 1 else f"images (rank 0 of {trainer.world_size})"
        self.images = tqdm(total=total, desc=label, unit="img", position=0, dynamic_ncols=True)
        steps = getattr(pl_module, "steps", None)
        self.steps = tqdm(total=steps, desc="steps", position=1, leave=False, dynamic_ncols=True)

    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.steps is not None:
            self.steps.reset()

    def on_optim_step(self, trainer: L.Trainer, pl_module: Any, step: int, losses: list[float]) -> None:
        """Advance the step bar, showing the group's mean loss."""
        if self.steps is not None:
            self.steps.update(1)
            self.steps.set_postfix(loss=f"{sum(losses) / len(losses):.4g}", refresh=False)

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.images is not None:
            self.images.update(len(batch))

    def on_predict_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        for bar in (self.steps, self.images):
            if bar is not None:
                bar.close()
        self.images = self.steps = None


@dataclass
class BatchReport:
    """What a batch run did, across all ranks; the same on every rank."""

    output: Path
    total: int
    skipped: list[str]
    results: list[PairResult]
    world_size: int = 1
    is_global_zero: bool = True
    done: list[PairResult] = field(init=False)
    failed: list[PairResult] = field(init=False)

    def __post_init__(self) -> None:
        self.done = [r for r in self.results if r.status == "done"]
        self.failed = [r for r in self.results if r.status == "failed"]

    @property
    def summary_path(self) -> Path:
        return self.output / SUMMARY_FILE

    def lines(self) -> list[str]:
        """The summary printed at the end: totals, one line per rank, one line per failure."""
        out = [
            f"{self.total} images: {len(self.done)} written, {len(self.skipped)} already complete (skipped), "
            f"{len(self.failed)} failed"
        ]
        for rank in range(self.world_size if self.results else 0):
            mine = [r for r in self.done if r.rank == rank]
            failed = sum(r.rank == rank for r in self.failed)
            seconds = sum(r.seconds for r in mine)
            rate = f", {60 * len(mine) / seconds:.1f} images/min" if seconds > 0 else ""
            out.append(f"  rank {rank}: {len(mine)} written, {failed} failed{rate}")
        out += [f"  failed {r.name}: {r.error}" for r in self.failed]
        out.append(f"summary: {self.summary_path}")
        return out

    def write(self) -> None:
        """Save the full record (every pair, its rank and status) as JSON beside the outputs."""
        record = {
            "total": self.total,
            "world_size": self.world_size,
            "skipped": self.skipped,
            "results": [asdict(r) for r in self.results],
        }
        write_text_atomic(self.summary_path, json.dumps(record, indent=1) + "\n")


def gather_results(results: list[PairResult]) -> list[PairResult]:
    """Every rank's results on every rank (one ``all_gather_object``); the local list when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(results)
    everyone: list[list[PairResult] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    return [r for rank in everyone for r in (rank or [])]


def build_batch_trainer(config: RunConfig, progress: bool = True, callbacks: list[Callback] | None = None) -> L.Trainer:
    """A Trainer for ``predict`` on the configured devices and nodes; gradients stay on, nothing is logged."""
    t = config.trainer
    own: list[Callback] = [BatchProgressBar()] if progress else []
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator),
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=own + list(callbacks or []),
        default_root_dir=config.output,
    )


def fit_batch(
    config: RunConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
) -> BatchReport:
    """Produce every content x style pair the config names, skipping outputs already complete.

    Writes ``OUTPUT/<content>__<style>.png`` per pair, ``config.yaml`` and ``batch-summary.json``;
    ``overwrite`` redoes complete pairs too. Returns the report of all ranks.
    """
    if config.trainer.precision == "16-mixed":
        raise ConfigError("trainer.precision=16-mixed is not supported for batch runs; use bf16-mixed or 32-true")
    pairs = expand_pairs(config)
    todo, complete = pending(pairs, overwrite)
    output = Path(config.output)
    if output.is_file():
        raise ConfigError(f"output {output} is a file; give a directory for the batch's images")
    check_writable(output)
    skipped = [p.name for p in complete]
    if not todo:
        report = BatchReport(output, len(pairs), skipped, [], is_global_zero=rank_zero_only.rank == 0)
    else:
        L.seed_everything(config.seed, workers=False, verbose=False)
        stylizer = BatchStylizer(
            steps=config.trainer.max_steps,
            loss=config.loss,
            optim=config.optim,
            features=config.features,
            init=init_input(config),
            seed=config.seed,
        )
        per_device = config.batch.images_per_device if lockstep_ok(config.optim) else 1
        data = StylePairsDataModule.from_config(config, todo, images_per_device=per_device)
        trainer = build_batch_trainer(config, progress=progress, callbacks=callbacks)
        trainer.predict(stylizer, datamodule=data, return_predictions=False)
        results = gather_results(stylizer.results)
        report = BatchReport(output, len(pairs), skipped, results, trainer.world_size, trainer.is_global_zero)
    if report.is_global_zero:
        write_text_atomic(output / "config.yaml", dump_config(config))
        report.write()
    return report
