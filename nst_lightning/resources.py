"""The memory plan: what a run of a given config needs (``nst_lightning.memory``'s arithmetic), what the machine
has free, the checkpointed blocks, tile and L-BFGS history that make it fit, and the advice when nothing does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .config import MAX_CHECKPOINT_BLOCKS, MAX_IMAGE_SIZE, FeaturesConfig, OptimConfig, RunConfig, all_layers
from .errors import ResourceError
from .free_memory import available_cpu_memory, available_cuda_memory, cuda_indices
from .hardware import cuda_run, resolve_precision
from .images import Loading, style_shape, target_shape
from .memory import GiB, MemoryEstimate, Shape, estimate_memory

TILE_CHOICES = (4096, 2048, 1024, 512, 256, 128, 64)
"""Tile sides ``features.tile=auto`` tries, largest (least halo overhead) first."""
MIN_HISTORY = 5
"""The shortest L-BFGS history the plan lowers ``optim.history_size`` to when nothing else makes a run fit."""

log = logging.getLogger(__name__)


def run_shapes(
    config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape], size: int
) -> tuple[Shape, list[Shape]]:
    """The content and style shapes a run of ``config`` uses at ``image.size = size``, from the source shapes."""
    image = config.image
    loading = Loading(**image.loading())
    shape = target_shape(content_shape[0], content_shape[1], size, image.fit, image.rounding)
    return shape, [style_shape(hw, shape, scale, loading) for hw, scale in zip(style_shapes, config.style_scales())]


def run_precision(config: RunConfig) -> str:
    """The precision the run will use (``auto`` resolved for its accelerator)."""
    return resolve_precision(config.trainer.precision, config.trainer.accelerator)


def checkpoint_choices(config: RunConfig) -> list[int]:
    """The ``features.checkpoint_blocks`` values a run may use, cheapest in compute first: the set one, or 0..4 for auto."""
    value = config.features.checkpoint_blocks
    return list(range(MAX_CHECKPOINT_BLOCKS + 1)) if value == "auto" else [value]


def tile_choices(config: RunConfig, shape: Shape) -> list[int]:
    """The tile sides a run of ``shape`` may use, untiled (0) first: 0 for ``off``, the set side, or for ``auto``
    0 and then every ``TILE_CHOICES`` side shorter than the image's long side (untiled only for the ``w2`` style
    loss, which a tiled evaluation cannot reproduce)."""
    value = config.features.tile
    if value == "off" or config.loss.style_loss == "w2":
        return [0]
    if value != "auto":
        return [value]
    return [0, *(t for t in TILE_CHOICES if t < max(shape))]


def estimate_for(
    config: RunConfig,
    content_shape: Shape,
    style_shapes: Sequence[Shape],
    size: int | None = None,
    checkpoint_blocks: int | None = None,
    batch: int = 1,
    tile: int | None = None,
    history_size: int | None = None,
) -> MemoryEstimate:
    """The estimate for ``config`` and source images of these shapes (at ``size`` instead of ``image.size`` if given).

    ``checkpoint_blocks`` and ``tile`` default to the most memory-saving values the config allows (see
    ``checkpoint_choices`` and ``tile_choices``); a tiled evaluation checkpoints nothing. ``batch`` images
    optimised together multiply everything but the shared weights. ``history_size`` (default the config's) is
    the L-BFGS history counted.
    """
    shape, styles = run_shapes(config, content_shape, style_shapes, size or config.image.size)
    tile = tile_choices(config, shape)[-1] if tile is None else tile
    if tile:
        checkpoint_blocks = 0
    one = estimate_memory(
        shape,
        styles,
        all_layers(config),
        config.loss.content_layers,
        precision=run_precision(config),
        optimizer=config.optim.name,
        history_size=config.optim.history_size if history_size is None else history_size,
        pooling=config.features.pooling,
        source_pixels=max(h * w for h, w in [content_shape, *style_shapes]),
        checkpoint_blocks=checkpoint_choices(config)[-1] if checkpoint_blocks is None else checkpoint_blocks,
        tile=tile,
        preconditioned=bool(config.optim.resolved_precondition_levels),
    )
    return replace(one, activations=one.activations * batch, optimizer=one.optimizer * batch, targets=one.targets * batch)


def plan_memory(
    config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape], available: int | None, batch: int = 1
) -> tuple[int, MemoryEstimate]:
    """The fewest checkpointed VGG blocks whose estimate fits in ``available`` bytes, and that estimate (whose
    ``tile`` says whether, and by which tiles, the evaluation must be tiled).

    Checkpointing costs a second forward of the blocks it covers and tiling the halo and a second pass, so
    they are used only as far as memory requires: untiled with the fewest blocks, then the largest tile.

    At print size the L-BFGS history (two image copies per step of history) can outweigh any tile: when nothing
    fits with the configured history, it is lowered (the estimate's ``history_size``, never below ``MIN_HISTORY``)
    with the cheapest choice that keeps at least half of it, else with the cheapest that fits at all: a small
    tile's halo costs more time than a shorter history costs steps. When nothing fits even so (or the free memory
    is unknown: then nothing is traded) the last choice is returned.
    """
    shape, _ = run_shapes(config, content_shape, style_shapes, config.image.size)
    choices = [(blocks, 0) for blocks in checkpoint_choices(config)] if tile_choices(config, shape)[0] == 0 else []
    choices += [(0, tile) for tile in tile_choices(config, shape) if tile]
    if available is None:
        choices = choices[:1]
    for blocks, tile in choices:
        estimate = estimate_for(config, content_shape, style_shapes, checkpoint_blocks=blocks, batch=batch, tile=tile)
        if available is None or estimate.total <= available:
            return blocks, estimate
    if available is None or config.optim.name != "lbfgs":
        return blocks, estimate
    kept = [(_longest_history(config, content_shape, style_shapes, available, batch, b, t), b, t) for b, t in choices]
    usable = [choice for choice in kept if choice[0]]
    if not usable:
        return blocks, estimate
    enough = [choice for choice in usable if 2 * choice[0] >= config.optim.history_size]
    history, blocks, tile = (enough or usable)[0]
    plan = estimate_for(config, content_shape, style_shapes, checkpoint_blocks=blocks, batch=batch, tile=tile, history_size=history)
    return blocks, plan


def _longest_history(
    config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape], available: int, batch: int, blocks: int, tile: int
) -> int:
    """The longest L-BFGS history below the configured one, at least ``MIN_HISTORY``, that fits; 0 if none does."""
    def fits(history: int) -> bool:
        estimate = estimate_for(
            config, content_shape, style_shapes, checkpoint_blocks=blocks, batch=batch, tile=tile, history_size=history
        )
        return estimate.total <= available

    low, high = MIN_HISTORY, config.optim.history_size - 1
    if high < low or not fits(low):
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def largest_size(
    config: RunConfig,
    content_shape: Shape,
    style_shapes: Sequence[Shape],
    available: int,
    upper: int | None = None,
    batch: int = 1,
) -> int | None:
    """The largest ``image.size`` up to ``upper`` (default the configured one) whose estimate for ``batch`` images
    fits in ``available`` bytes."""
    low, high = 16, upper or config.image.size
    if estimate_for(config, content_shape, style_shapes, low, batch=batch).total > available:
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if estimate_for(config, content_shape, style_shapes, mid, batch=batch).total <= available:
            low = mid
        else:
            high = mid - 1
    return low


def target_device(config: RunConfig) -> tuple[str, int | None]:
    """Where the run will compute (``cpu``, ``cuda`` or ``other``) and the free bytes there, None if unknown.

    On CUDA the least free memory among the devices the run uses: every rank must fit.
    """
    accelerator = config.trainer.accelerator
    if accelerator == "cpu":
        return "cpu", available_cpu_memory()
    if cuda_run(accelerator):
        import torch

        indices = cuda_indices(config.trainer.devices, torch.cuda.device_count()) or [0]
        return "cuda", min(available_cuda_memory(i) for i in indices)
    if accelerator == "auto":
        return "cpu", available_cpu_memory()
    return "other", None


def advice(config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape], available: int | None) -> str:
    """What to change when a run does not fit: the largest size that would, and a cheaper precision."""
    size = largest_size(config, content_shape, style_shapes, available) if available is not None else None
    if available is not None and size is None:
        tips = ["even the smallest image.size does not fit; free memory or use a larger machine"]
    elif size is not None and size < config.image.size:
        tips = [f"set image.size={size} or lower (the largest that fits by estimate)"]
    else:
        tips = ["lower image.size"]
    if config.features.tile == "off" and config.loss.style_loss != "w2" and available is not None:
        smallest = TILE_CHOICES[-1]
        if estimate_for(config, content_shape, style_shapes, tile=smallest).total <= available:
            tips.insert(0, "set features.tile=auto (exact tiled evaluation: memory set by the tile, not the image)")
    if max(config.style_scales()) > 1:
        tips.append(f"lower image.style_scale (now {config.image.style_scale})")
    if config.optim.name == "lbfgs" and config.optim.history_size > 10:
        tips.append(f"lower optim.history_size (now {config.optim.history_size})")
    if run_precision(config) == "32-true":
        tips.append("use trainer.precision=bf16-mixed")
    return "; ".join(tips)


def check_fits(
    config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape], batch: int = 1
) -> tuple[int, MemoryEstimate]:
    """The VGG blocks to checkpoint and the estimate for ``batch`` images optimised together; ResourceError
    before anything starts when even that does not fit."""
    device, available = target_device(config)
    blocks, estimate = plan_memory(config, content_shape, style_shapes, available, batch)
    if available is not None and estimate.total > available:
        saving = f" with {blocks} VGG blocks checkpointed" if blocks else ""
        saving += f" even with features.tile={estimate.tile}" if estimate.tile else ""
        images = f" ({batch} images together; lower batch.images_per_device)" if batch > 1 else ""
        raise ResourceError(
            f"image.size={config.image.size}{images} needs {estimate.describe()}{saving} but {device} has only "
            f"{available / GiB:.1f} GiB free; {advice(config, content_shape, style_shapes, available)}"
        )
    return blocks, estimate


@dataclass(frozen=True)
class Plan:
    """How a run fits in memory: the sections it runs with (checkpointed VGG blocks, tile and L-BFGS history
    resolved from ``auto`` and the free memory) and the estimate they give."""

    features: FeaturesConfig
    optim: OptimConfig
    estimate: MemoryEstimate


def plan_run(
    config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape], batch: int = 1, size: int | None = None
) -> Plan:
    """The plan for ``batch`` images of these shapes at ``size`` (a stage's; default ``image.size``: an earlier,
    smaller stage of a tiled run may fit whole); ResourceError when even the most recomputation, the smallest
    tile and the shortest history do not fit. A lowered L-BFGS history is said in a warning."""
    if size is not None:
        config = config.model_copy(update={"image": config.image.model_copy(update={"size": size})})
    blocks, estimate = check_fits(config, content_shape, style_shapes, batch=batch)
    features = config.features.model_copy(update={"checkpoint_blocks": blocks, "tile": estimate.tile or "off"})
    optim = config.optim
    if estimate.history_size and estimate.history_size < optim.history_size:
        log.warning(
            "image.size=%d: optim.history_size lowered from %d to %d so the L-BFGS history fits (%s); set "
            "optim.history_size=%d to choose it yourself, or free memory",
            config.image.size, optim.history_size, estimate.history_size, estimate.describe(), estimate.history_size,
        )
        optim = optim.model_copy(update={"history_size": estimate.history_size})
    return Plan(features, optim, estimate)


def is_out_of_memory(err: BaseException) -> bool:
    """True for torch's OutOfMemoryError (CUDA), the CPU allocator's RuntimeError and Python's MemoryError."""
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def out_of_memory_message(config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape]) -> str:
    """The message for an out-of-memory failure mid-run, with the same advice as the early check."""
    device, available = target_device(config)
    _, estimate = plan_memory(config, content_shape, style_shapes, available)
    return (
        f"ran out of memory on {device} at image.size={config.image.size} (estimated need {estimate.describe()}); "
        + advice(config, content_shape, style_shapes, available)
    )


def summary(config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape], batch: int = 1) -> str:
    """A few lines for people planning a run of ``batch`` images optimised together: the shapes, the estimate, the
    free memory and the largest size that fits."""
    (h, w), styles = run_shapes(config, content_shape, style_shapes, config.image.size)
    device, available = target_device(config)
    blocks, estimate = plan_memory(config, content_shape, style_shapes, available, batch=batch)
    optimizer = config.optim.name
    lowered = config.optim.name == "lbfgs" and estimate.history_size < config.optim.history_size
    if config.optim.name == "lbfgs":
        optimizer += f" (history {config.optim.history_size}" + (f", lowered to {estimate.history_size} to fit)" if lowered else ")")
    lines = [
        f"image {w}x{h}, styles {', '.join(f'{sw}x{sh}' for sh, sw in styles)}; {run_precision(config)}, {optimizer}",
        f"needs {estimate.describe()}" + (f" with {blocks} VGG blocks checkpointed" if blocks else ""),
    ]
    if available is None:
        lines.append(f"free memory on {device} is unknown")
    else:
        size = largest_size(config, content_shape, style_shapes, available, upper=MAX_IMAGE_SIZE, batch=batch)
        kept = f" with history {config.optim.history_size}" if lowered else ""
        lines.append(f"{device} has {available / GiB:.1f} GiB free; largest image.size that fits{kept}: {size or 'none'}")
    return "\n".join(lines)
