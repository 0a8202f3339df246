"""Memory: what a run of a given size needs, what the machine has, and the advice when it does not fit.

The estimate follows the network layer by layer (what autograd keeps for the backward pass), adds the
optimiser's copies of the image and the frozen weights. Arithmetic only: nothing is allocated to find out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import MAX_IMAGE_SIZE, RunConfig, all_layers
from .errors import ResourceError
from .hardware import resolve_precision
from .images import target_shape
from .layers import LAYER_NAMES, LAYER_INDEX

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

    @property
    def total(self) -> int:
        """The whole peak, with slack for the allocator."""
        running = self.weights + self.activations + self.optimizer + self.targets
        return round(max(running, self.loading) * SLACK)

    def describe(self) -> str:
        """One line: the total and its largest parts."""
        return (
            f"about {self.total / GiB:.1f} GiB (activations {self.activations / GiB:.2f}, optimizer "
            f"{self.optimizer / GiB:.2f}, targets {self.targets / GiB:.2f}, weights {self.weights / GiB:.2f} GiB)"
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
    height: int, width: int, layers: Sequence[str], precision: str = "32-true", pooling: str = "max"
) -> int:
    """Peak bytes of one forward and backward pass through VGG19 for a ``height x width`` image.

    Autograd keeps every ReLU and pooling output (max pooling also its int64 indices); a convolution's
    output lives only until its ReLU. Mixed precision halves those, but the loss layers are copied to
    fp32 for the Grams. The backward pass adds about three of the largest layer (the gradients of a
    ReLU's output, of its convolution's output and of that convolution's input).
    """
    size = 2 if precision in ("bf16-mixed", "16-mixed") else 4
    deepest = max(LAYER_INDEX[n] for n in layers)
    walk = _walk(height, width, deepest)
    kept = 4 * 3 * height * width * 4  # the image in 0..1, flipped, normalised and its cast
    largest = 0
    for name, channels, pixels in walk:
        largest = max(largest, channels * pixels * size)
        if name.startswith("relu") or name.startswith("pool"):
            kept += channels * pixels * size
        if name.startswith("pool") and pooling == "max":
            kept += channels * pixels * 8
        if name in layers and size != 4:
            kept += channels * pixels * 4
    return kept + 3 * largest


def style_pass_bytes(height: int, width: int, layers: Sequence[str]) -> int:
    """Peak bytes of the gradient-free pass computing a style image's Grams: its kept layers and two more."""
    deepest = max(LAYER_INDEX[n] for n in layers)
    walk = _walk(height, width, deepest)
    kept = sum(c * p * 4 for name, c, p in walk if name in layers)
    return kept + 2 * max(c * p * 4 for _, c, p in walk)


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
) -> MemoryEstimate:
    """Peak memory of a run producing an ``(H, W)`` image from styles of ``style_shapes``.

    ``layers``: every loss layer; ``content_layers``: those whose content features are kept as targets;
    ``source_pixels``: the largest input image's pixel count at full size.
    """
    height, width = shape
    image = 3 * height * width * 4
    # image, gradient, last good copy; L-BFGS adds 2 * history_size flat copies and ~4 work vectors, Adam 2 moments
    copies = 3 + (2 * history_size + 4 if optimizer == "lbfgs" else 3)
    style_pass = max(style_pass_bytes(h, w, layers) for h, w in style_shapes)
    deepest = max(LAYER_INDEX[n] for n in layers)
    content_features = sum(c * p * 4 for name, c, p in _walk(height, width, deepest) if name in content_layers)
    grams = sum(CHANNELS[int(n[4])] ** 2 * 4 for n in layers)
    return MemoryEstimate(
        weights=VGG19_WEIGHT_BYTES * 2,
        activations=max(activation_bytes(height, width, layers, precision, pooling), style_pass),
        optimizer=copies * image,
        targets=image + sum(3 * h * w * 4 for h, w in style_shapes) + content_features + grams,
        loading=source_pixels * LOAD_BYTES_PER_PIXEL,
    )


def run_shapes(
    config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape], size: int
) -> tuple[Shape, list[Shape]]:
    """The content and style shapes a run of ``config`` uses at ``image.size = size``, from the source shapes."""
    shape = target_shape(content_shape[0], content_shape[1], size, config.image.fit)
    style_side = max(8, round(max(shape) * config.image.style_scale))
    return shape, [target_shape(h, w, style_side, "long") for h, w in style_shapes]


def run_precision(config: RunConfig) -> str:
    """The precision the run will use (``auto`` resolved for its accelerator)."""
    return resolve_precision(config.trainer.precision, config.trainer.accelerator)


def estimate_for(
    config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape], size: int | None = None
) -> MemoryEstimate:
    """The estimate for ``config`` and source images of these shapes (at ``size`` instead of ``image.size`` if given)."""
    shape, styles = run_shapes(config, content_shape, style_shapes, size or config.image.size)
    return estimate_memory(
        shape,
        styles,
        all_layers(config),
        config.loss.content_layers,
        precision=run_precision(config),
        optimizer=config.optim.name,
        history_size=config.optim.history_size,
        pooling=config.features.pooling,
        source_pixels=max(h * w for h, w in [content_shape, *style_shapes]),
    )


def largest_size(
    config: RunConfig,
    content_shape: Shape,
    style_shapes: Sequence[Shape],
    available: int,
    upper: int | None = None,
) -> int | None:
    """The largest ``image.size`` up to ``upper`` (default the configured one) whose estimate fits in ``available`` bytes."""
    low, high = 16, upper or config.image.size
    if estimate_for(config, content_shape, style_shapes, low).total > available:
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if estimate_for(config, content_shape, style_shapes, mid).total <= available:
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


def available_cuda_memory(index: int = 0) -> int:
    """Free bytes on CUDA device ``index``."""
    import torch

    free, _ = torch.cuda.mem_get_info(index)
    return int(free)


def target_device(config: RunConfig) -> tuple[str, int | None]:
    """Where the run will compute (``cpu``, ``cuda`` or ``other``) and the free bytes there, None if unknown."""
    accelerator = config.trainer.accelerator
    if accelerator == "cpu":
        return "cpu", available_cpu_memory()
    if accelerator in ("auto", "gpu", "cuda"):
        import torch

        if torch.cuda.is_available():
            devices = config.trainer.devices
            index = devices[0] if isinstance(devices, list) and devices else 0
            return "cuda", available_cuda_memory(index)
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
    if config.image.style_scale > 1:
        tips.append(f"lower image.style_scale (now {config.image.style_scale:g})")
    if config.optim.name == "lbfgs" and config.optim.history_size > 10:
        tips.append(f"lower optim.history_size (now {config.optim.history_size})")
    if run_precision(config) == "32-true":
        tips.append("use trainer.precision=bf16-mixed")
    return "; ".join(tips)


def check_fits(config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape]) -> MemoryEstimate:
    """Raise ResourceError before anything starts when the run's estimate exceeds the free memory of its device."""
    estimate = estimate_for(config, content_shape, style_shapes)
    device, available = target_device(config)
    if available is not None and estimate.total > available:
        raise ResourceError(
            f"image.size={config.image.size} needs {estimate.describe()} but {device} has only "
            f"{available / GiB:.1f} GiB free; {advice(config, content_shape, style_shapes, available)}"
        )
    return estimate


def is_out_of_memory(err: BaseException) -> bool:
    """True for torch's OutOfMemoryError (CUDA), the CPU allocator's RuntimeError and Python's MemoryError."""
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def out_of_memory_message(config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape]) -> str:
    """The message for an out-of-memory failure mid-run, with the same advice as the early check."""
    estimate = estimate_for(config, content_shape, style_shapes)
    device, available = target_device(config)
    return (
        f"ran out of memory on {device} at image.size={config.image.size} (estimated need {estimate.describe()}); "
        + advice(config, content_shape, style_shapes, available)
    )


def summary(config: RunConfig, content_shape: Shape, style_shapes: Sequence[Shape]) -> str:
    """A few lines for people planning a run: the shapes, the estimate, the free memory and the largest size that fits."""
    (h, w), styles = run_shapes(config, content_shape, style_shapes, config.image.size)
    estimate = estimate_for(config, content_shape, style_shapes)
    device, available = target_device(config)
    optimizer = config.optim.name + (f" (history {config.optim.history_size})" if config.optim.name == "lbfgs" else "")
    lines = [
        f"image {w}x{h}, styles {', '.join(f'{sw}x{sh}' for sh, sw in styles)}; {run_precision(config)}, {optimizer}",
        f"needs {estimate.describe()}",
    ]
    if available is None:
        lines.append(f"free memory on {device} is unknown")
    else:
        size = largest_size(config, content_shape, style_shapes, available, upper=MAX_IMAGE_SIZE)
        lines.append(f"{device} has {available / GiB:.1f} GiB free; largest image.size that fits: {size or 'none'}")
    return "\n".join(lines)
