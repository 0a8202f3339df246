"""Memory a run needs, by arithmetic: layer by layer what autograd keeps for the backward pass, the optimiser's
copies of the image, the targets and the frozen weights. Nothing is allocated to find out; the plan against the
free memory is ``nst_lightning.resources``'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
TILED_IMAGE_COPIES = 10
"""Whole-image fp32 copies a tiled evaluation holds besides the tile's pass: the input, what VGG sees, its
gradient, the image's gradient and the pixel terms' autograd (total variation, chroma, border)."""
PRECONDITIONER_COPIES = 3
"""Image-sized fp32 copies while L-BFGS applies the smoothing preconditioner: ``P v`` and one blur's two passes."""


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
    history_size: int = 0
    """The L-BFGS history the optimiser's part counts (0 for Adam)."""

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
    preconditioned: bool = False,
) -> MemoryEstimate:
    """Peak memory of a run producing an ``(H, W)`` image from styles of ``style_shapes``.

    ``layers``: every loss layer; ``content_layers``: those whose content features are kept as targets;
    ``source_pixels``: the largest input image's pixel count at full size; ``checkpoint_blocks``: VGG blocks
    recomputed in the backward pass (``features.checkpoint_blocks``); ``tile``: the tile side of a tiled
    evaluation (the network then sees one tile and its halo at a time, targets included; no checkpointing);
    ``preconditioned``: L-BFGS applies ``optim.SmoothingPreconditioner`` (its result and two blur passes).
    """
    height, width = shape
    image = 3 * height * width * 4
    # image, gradient, last good copy; L-BFGS adds 2 * history_size flat copies and ~4 work vectors, Adam 2 moments
    copies = 3 + (2 * history_size + 4 if optimizer == "lbfgs" else 3)
    if preconditioned and optimizer == "lbfgs":
        copies += PRECONDITIONER_COPIES
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
        history_size=history_size if optimizer == "lbfgs" else 0,
    )
