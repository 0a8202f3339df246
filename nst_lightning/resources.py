"""Memory: what a run of a given size needs, what the machine has, and the advice when it does not fit.

The estimate follows the network layer by layer (what autograd keeps for the backward pass), adds the
optimiser's copies of the image and the frozen weights. Arithmetic only: nothing is allocated to find out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .config import MAX_CHECKPOINT_BLOCKS, MAX_IMAGE_SIZE, RunConfig, all_layers
from .errors import ConfigError, ResourceError
from .hardware import cuda_run, nvml_device, resolve_precision
from .images import Loading, style_shape, target_shape
from .layers import LAYER_NAMES, LAYER_INDEX, aligned_tile, halo

Shape = tuple[int, int]
"""An image's ``(H, W)``."""
GiB = 1024**3
CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
"""Output channels of the convolutions in each VGG19 block."""
VGG19_WEIGHT_BYTES = 80_130_000
"""All 16 convolutions' weights in fp32: the state dict built when the network is loaded."""
SLACK = 1.15
"""Allocator fragmentation and small temporaries not followed one by one."""
LOAD_BYTES_PER_PIXEL = 27
"""Decoding a source image: Pillow's 8-bit RGB, then two float32 copies (array and NCHW tensor)."""
TILE_CHOICES = (4096, 2048, 1024, 512, 256, 128, 64)
"""Tile sides ``features.tile=auto`` tries, largest (least halo overhead) first."""
TILED_IMAGE_COPIES = 10
"""Whole-image fp32 copies a tiled evaluation holds besides the tile's pass: the input, what VGG sees, its
gradient, the image's gradient and the pixel terms' autograd (total variation, chroma, border)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of a run in bytes, by what holds it."""

    weights: int
    """The frozen network, and the full weight file while it loads."""
    activations: int
    """Layer outputs kept for the backward pass plus its working set, or the style pass if larger."""
    optimizer: int
    """The image, its gradient, the last good copy and the optimiser's state (L-BFGS history)."""
    targets: int
    """Content and style images, content features and style Grams."""
    loading: int = 0
    """Decoding the largest source image at full size, before the run (a separate, earlier peak)."""
    tile: int = 0
    """The tile side of a tiled evaluation (``features.tile``), 0 for the whole image at once."""

    @property
    def total(self) -> int:
        """The whole peak, with slack for the allocator."""
        running = self.weights + self.activations + self.optimizer + self.targets
        return round(max(running, self.loading) * SLACK)

    def describe(self) -> str:
        """One line: the total and its largest parts."""
        tiled = f", tiled by {self.tile} px" if self.tile else ""
        return (
            f"about {self.total / GiB:.1f} GiB (activations {self.activations / GiB:.2f}, optimizer "
            f"{self.optimizer / GiB:.2f}, targets {self.targets / GiB:.2f}, weights {self.weights / GiB:.2f} GiB{tiled})"
        )


def _walk(height: int, width: int, deepest: int) -> list[tuple[str, int, int]]:
    """``(layer, channels, pixels)`` for every layer up to ``deepest``: each layer's output size."""
    out = []
    h, w, channels = height, width, 3
    for name in LAYER_NAMES[: deepest + 1]:
        if name.startswith("pool"):
            h, w = h // 2, w // 2
        else:
            channels = CHANNELS[int(name[4])]
        out.append((name, channels, h * w))
    return out


def activation_bytes(
    height: int,
    width: int,
    layers: Sequence[str],
    precision: str = "32-true",
    pooling: str = "max",
    checkpoint_blocks: int = 0,
) -> int:
    """Peak bytes of one forward and backward pass through VGG19 for a ``height x width`` image.

    Autograd keeps every ReLU and pooling output (max pooling also its int64 indices) in the network's
    dtype; a convolution's output lives only until its ReLU, and the Grams keep no fp32 copies. The peak
    comes as the backward starts: all of that plus the gradients of the loss layers. A checkpointed block
    keeps only its loss layers and its pooled output; the backward recomputes it, holding it again with
    the gradient of its largest layer (a second, usually smaller peak). Within -6%..+23% of one step's
    peak measured on the CPU at 512 and 1024 px, fp32 and bf16, 0, 2 and 4 blocks.
    """
    size = 2 if precision in ("bf16-mixed", "16-mixed") else 4
    deepest = max(LAYER_INDEX[n] for n in layers)
    walk = _walk(height, width, deepest)
    recomputed = min(checkpoint_blocks, sum(1 for name, _, _ in walk if name.startswith("pool")))
    image = 4 * 3 * height * width * 4  # the image in 0..1, flipped, normalised and its cast
    kept = 0  # what autograd keeps through the forward pass
    loss_grads = 0  # gradients of the loss layers (cast to the network's dtype), waiting for the backward
    block = {b: [0, 0] for b in range(1, 6)}  # per recomputed block: what it holds again, its largest layer
    for name, channels, pixels in walk:
        layer = channels * pixels * size
        held = layer if name.startswith(("relu", "pool")) else 0
        if name.startswith("pool") and pooling == "max":
            held += channels * pixels * 8
        if name in layers:
            loss_grads += layer
        number = int(name[4])
        if number <= recomputed:
            block[number][0] += held
            block[number][1] = max(block[number][1], layer)
            kept += layer if name in layers or name.startswith("pool") else 0
        else:
            kept += held
    forward = image + kept + loss_grads
    recompute = max(image + again + largest for again, largest in block.values())
    return max(forward, recompute)


def target_pass_bytes(height: int, width: int, layers: Sequence[str]) -> int:
    """Peak bytes of the gradient-free pass computing an image's targets (style Grams, content features): its
    kept layers and two more, in fp32 whatever the run's precision (targets come from the fp32 extractor)."""
    size = 4
    deepest = max(LAYER_INDEX[n] for n in layers)
    walk = _walk(height, width, deepest)
    kept = sum(c * p * size for name, c, p in walk if name in layers)
    return kept + 2 * max(c * p * size for _, c, p in walk)


def estimate_memory(
    shape: Shape,
    style_shapes: Sequence[Shape],
    layers: Sequence[str],
    content_layers: Sequence[str] = ("relu4_2",),
    *,
    precision: str = "32-true",
    optimizer: str = "lbfgs",
    history_size: int = 20,
    pooling: str = "max",
    source_pixels: int = 0,
    checkpoint_blocks: int = 0,
    tile: int = 0,
) -> MemoryEstimate:
    """Peak memory of a run producing an ``(H, W)`` image from styles of ``style_shapes``.

    ``layers``: every loss layer; ``content_layers``: those whose content features are kept as targets;
    ``source_pixels``: the largest input image's pixel count at full size; ``checkpoint_blocks``: VGG blocks
    recomputed in the backward pass (``features.checkpoint_blocks``); ``tile``: the tile side of a tiled
    evaluation (the network then sees one tile and its halo at a time, targets included; no checkpointing).
    """
    height, width = shape
    image = 3 * height * width * 4
    # image, gradient, last good copy; L-BFGS adds 2 * history_size flat copies and ~4 work vectors, Adam 2 moments
    copies = 3 + (2 * history_size + 4 if optimizer == "lbfgs" else 3)
    if tile:
        side = aligned_tile(tile, layers) + 2 * halo(layers)
        network = activation_bytes(min(height, side), min(width, side), layers, precision, pooling) + TILED_IMAGE_COPIES * image
        target_pass = max(target_pass_bytes(min(h, side), min(w, side), layers) for h, w in [shape, *style_shapes])
    else:
        network = activation_bytes(height, width, layers, precision, pooling, checkpoint_blocks)
        target_pass = max(target_pass_bytes(h, w, layers) for h, w in [shape, *style_shapes])
    deepest = max(LAYER_INDEX[n] for n in layers)
    content_features = sum(c * p * 4 for name, c, p in _walk(height, width, deepest) if name in content_layers)
    grams = sum(CHANNELS[int(n[4])] ** 2 * 4 for n in layers)
    return MemoryEstimate(
        weights=VGG19_WEIGHT_BYTES * 2,
        activations=max(network, target_pass),
        optimizer=copies * image,
        targets=image + sum(3 * h * w * 4 for h, w in style_shapes) + content_features + grams,
        loading=source_pixels * LOAD_BYTES_PER_PIXEL,
        tile=tile,
    )


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
) -> MemoryEstimate:
    """The estimate for ``config`` and source images of these shapes (at ``size`` instead of ``image.size`` if given).

    ``checkpoint_blocks`` and ``tile`` default to the most memory-saving values the config allows (see
    ``checkpoint_choices`` and ``tile_choices``); a tiled evaluation checkpoints nothing. ``batch`` images
    optimised together multiply everything but the shared weights.
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
        history_size=config.optim.history_size,
        pooling=config.features.pooling,
        source_pixels=max(h * w for h, w in [content_shape, *style_shapes]),
        checkpoint_blocks=checkpoint_choices(config)[-1] if checkpoint_blocks is None else checkpoint_blocks,
        tile=tile,
    )
    return replace(one, activations=one.activations * batch, optimizer=one.optimizer * batch, targets=one.targets * batch)


def plan_memory(
    config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape], available: int | None, batch: int = 1
) -> tuple[int, MemoryEstimate]:
    """The fewest checkpointed VGG blocks whose estimate fits in ``available`` bytes, and that estimate (whose
    ``tile`` says whether, and by which tiles, the evaluation must be tiled).

    Checkpointing costs a second forward of the blocks it covers and tiling the halo and a second pass, so
    they are used only as far as memory requires: untiled with the fewest blocks, then the largest tile. When
    nothing fits (or the free memory is unknown: then nothing is traded) the last choice is returned.
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
    return blocks, estimate


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


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def available_cpu_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, or less when a cgroup limit is lower; None if unknown."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit, usage in [("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")]:
        cap, used = _read_int(Path("/sys/fs/cgroup") / limit), _read_int(Path("/sys/fs/cgroup") / usage)
        if cap is not None and used is not None and cap < 1 << 60:
            found.append(max(0, cap - used))
    return min(found) if found else None


CUDA_CONTEXT_BYTES = GiB
"""What the run's own CUDA context (with cuBLAS and cuDNN handles) will take: NVML's free memory, read before
the context exists, does not count it yet (torch's ``mem_get_info`` afterwards would). An allowance, not a
measurement: gpu_check.py's peak figures are the check."""


def available_cuda_memory(index: int = 0) -> int:
    """Free bytes on CUDA device ``index`` for the run, asked through NVML so the launching process does not
    initialise CUDA (less the context the run will create)."""
    device = nvml_device(index)
    if device is not None:
        return max(0, device.free_bytes - CUDA_CONTEXT_BYTES)
    import torch

    free, _ = torch.cuda.mem_get_info(index)  # no NVML, or CUDA already initialised
    return int(free)


def cuda_indices(devices: int | str | list[int], count: int) -> list[int]:
    """The CUDA devices a Trainer with ``trainer.devices`` uses out of ``count`` visible ones (all for ``auto``/-1)."""
    if isinstance(devices, list):
        return list(devices)
    if isinstance(devices, int) and devices > 0:
        return list(range(min(devices, count)))
    if isinstance(devices, str) and devices.strip().isdigit() and int(devices) > 0:
        return list(range(min(int(devices), count)))
    return list(range(count))


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


def refuse_tiling(config: RunConfig, runs: str) -> None:
    """ConfigError for ``features.tile`` in a kind of run that does not tile (folder runs, clips)."""
    if config.features.tile != "off":
        raise ConfigError(
            f"features.tile={config.features.tile} is for single and staged runs; {runs} evaluate whole images, "
            "so set features.tile=off (or lower image.size)"
        )


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
    optimizer = config.optim.name + (f" (history {config.optim.history_size})" if config.optim.name == "lbfgs" else "")
    lines = [
        f"image {w}x{h}, styles {', '.join(f'{sw}x{sh}' for sh, sw in styles)}; {run_precision(config)}, {optimizer}",
        f"needs {estimate.describe()}" + (f" with {blocks} VGG blocks checkpointed" if blocks else ""),
    ]
    if available is None:
        lines.append(f"free memory on {device} is unknown")
    else:
        size = largest_size(config, content_shape, style_shapes, available, upper=MAX_IMAGE_SIZE, batch=batch)
        lines.append(f"{device} has {available / GiB:.1f} GiB free; largest image.size that fits: {size or 'none'}")
    return "\n".join(lines)
