"""The sections of the run configuration (image, features, loss, optim, trainer, ...): typed fields with their
defaults, descriptions and per-field checks; ``config.RunConfig`` assembles them and checks across them.

Imports neither torch nor lightning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .layers import canonical_layer

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLE_CONTENT = EXAMPLES_DIR / "astronaut.jpg"
EXAMPLE_STYLE = EXAMPLES_DIR / "starry_night.jpg"
EXAMPLE_STYLE_2 = EXAMPLES_DIR / "the_scream.jpg"

DEFAULT_STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
INIT_KEYWORDS = ("content", "noise", "style")
DEFAULT_PRECONDITION_LEVELS = 5
DEFAULT_STEPS = 100  # preconditioned L-BFGS steps that reach what 300 plain ones did (README, "Time to quality")
MAX_IMAGE_SIZE = 16384
MAX_CHECKPOINT_BLOCKS = 4
"""VGG blocks that end in a pooling layer before relu5_1, the ones activation checkpointing can cover."""

MIN_TILE = 16
"""The smallest ``features.tile``: one position of relu5_1."""

PositiveFloat = Field(gt=0)


class Section(BaseModel):
    """A config section: unknown keys, infinities and NaNs refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ImageConfig(Section):
    """Output size. ``size`` measures the side named by ``fit`` (the long side by default)."""

    size: int = Field(512, ge=16, le=MAX_IMAGE_SIZE, description="pixels along the side named by `fit`")
    fit: Literal["long", "short", "height", "width"] = Field("long", description="which side `size` sets")
    rounding: Literal["round", "floor"] = Field(
        "round", description="the other side rounded, or truncated as the Keras notebook and torchvision's Resize do"
    )
    resample: Literal["bicubic", "nearest", "bilinear", "lanczos", "pil_bicubic"] = Field(
        "bicubic",
        description="bicubic: antialiased on float pixels | nearest, bilinear, lanczos, pil_bicubic: Pillow's filters "
        "in 8 bits, as the seeds' loaders",
    )
    style_fit: Literal["keep_aspect", "stretch"] = Field(
        "keep_aspect", description="keep the style's aspect ratio, or stretch it to the content's shape (times style_scale)"
    )
    style_scale: Union[float, list[float]] = Field(
        1.0, description="style image size relative to `size`; one value, or one per style image"
    )

    @field_validator("style_scale")
    @classmethod
    def _scale_range(cls, scale: float | list[float]) -> float | list[float]:
        values = scale if isinstance(scale, list) else [scale]
        if not values or any(not 0 < v <= 8 for v in values):
            raise ValueError("style_scale must be in (0, 8], one value or a non-empty list")
        return scale

    def loading(self) -> dict[str, str]:
        """The keyword arguments of ``images.Loading``: resampling, rounding and style fit."""
        return {"resample": self.resample, "rounding": self.rounding, "style_fit": self.style_fit}


class FeaturesConfig(Section):
    """Which VGG19 weights and pooling the extractor uses."""

    weights: str = Field("caffe", description="caffe | torchvision | path to a .pth state dict")
    pooling: Literal["max", "avg"] = "max"
    padding: Literal["zeros", "replicate"] = Field(
        "zeros",
        description="convolution padding: zeros (VGG as trained) | replicate (edge pixels repeated: no artificial "
        "frame at the borders)",
    )
    margin: int = Field(
        0,
        ge=0,
        le=64,
        description="pixels of mirrored image added on every side before VGG (output and content alike), so the "
        "zero padding's frame lies outside the image",
    )
    preprocessing: Literal["auto", "caffe", "torchvision"] = Field(
        "auto", description="input normalisation; auto follows the weights"
    )
    allow_download: bool = Field(False, description="let torchvision download its weights if not cached")
    onnx: str | None = Field(
        None, description="graph from `nst-lightning export` computing the fixed targets with onnxruntime"
    )
    validate_onnx: bool = Field(False, description="check the graph against the torch extractor on the run's images first")
    checkpoint_blocks: Union[Literal["auto"], int] = Field(
        "auto",
        description="recompute the first N VGG blocks in backward to save activation memory; "
        "auto: the fewest that make the run fit, by the memory estimate, and one more whenever an image's "
        "first step runs out of memory",
    )

    tile: Union[Literal["auto", "off"], int] = Field(
        "off",
        description="evaluate the loss exactly tile by tile, N px per tile side (rounded up to the pooling grid), so "
        "memory is set by the tile, not the image; auto: tiles only when the memory estimate says the whole image "
        "does not fit, the largest tile that does; off: never",
    )

    @field_validator("tile", mode="before")
    @classmethod
    def _tile(cls, value: object) -> object:
        if value is False:  # YAML 1.1 reads a bare `off` as false
            return "off"
        if value in ("auto", "off") or (isinstance(value, int) and not isinstance(value, bool) and value >= MIN_TILE):
            return value
        raise ValueError(f"must be auto, off or a tile side of at least {MIN_TILE} px, got {value!r}")

    @field_validator("checkpoint_blocks", mode="before")
    @classmethod
    def _blocks(cls, value: object) -> object:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_CHECKPOINT_BLOCKS):
            return value
        raise ValueError(f"must be auto or a whole number 0..{MAX_CHECKPOINT_BLOCKS}, got {value!r}")

    @model_validator(mode="after")
    def _validation_needs_a_graph(self) -> FeaturesConfig:
        if self.validate_onnx and not self.onnx:
            raise ValueError(
                "features.validate_onnx=true needs features.onnx, a graph written by `nst-lightning export --config ...`"
            )
        return self


class LossConfig(Section):
    """Loss terms: content + style + total variation, their layers and weights."""

    content_layers: list[str] = Field(default_factory=lambda: ["relu4_2"], min_length=1)
    style_layers: list[str] = Field(default_factory=lambda: list(DEFAULT_STYLE_LAYERS), min_length=1)
    style_layer_weights: list[float] | None = Field(
        None, description="one weight per style layer; default 1/len(style_layers) each"
    )
    content_weight: float = Field(1.0, ge=0)
    style_weight: float = Field(10.0, ge=0)
    tv_weight: float = Field(0.0, ge=0)
    chroma_weight: float = Field(
        3e-4,
        ge=0,
        description="colour smoothness: mean squared Cb/Cr difference of neighbouring pixels (0..255 units); "
        "removes colour speckle, leaves luminance detail; sized for the relative losses",
    )
    border_weight: float = Field(
        3e-4,
        ge=0,
        description="border smoothness: squared difference between neighbouring pixel lines across each side's outer "
        "8 lines, tapered inwards (0..255 units); removes the strips VGG's zero padding leaves along the edges",
    )
    content_loss: Literal["mse", "paper", "sum", "relative"] = Field(
        "relative", description="mse | paper (1/2 sum of squares) | sum (as Keras) | relative (over the target's norm)"
    )
    style_loss: Literal["paper", "keras", "mean_chw", "relative", "w2"] = Field(
        "relative",
        description="paper: 1/(4 N^2 M^2) per layer | keras: N=3, M=image pixels | mean_chw: mean((G-A)^2)/(N*M) "
        "on unnormalised Grams, as the PyTorch tutorials | relative: |G-A|^2/|A|^2 | w2: squared Wasserstein-2 "
        "distance of Gaussian fits (feature mean and covariance) over the channel count, as crowsonkb's",
    )
    tv_loss: Literal["keras", "squared", "nine_point"] = Field(
        "keras",
        description="keras: sum((dx^2+dy^2)^1.25) | squared: sum(dx^2)+sum(dy^2), pixels in 0..255 | nine_point: "
        "crowsonkb's mean-based L2 stencil (axes and diagonals) on 0..1 pixels",
    )

    @field_validator("content_layers", "style_layers")
    @classmethod
    def _known_layers(cls, names: list[str]) -> list[str]:
        return [canonical_layer(n) for n in names]

    @field_validator("style_layer_weights")
    @classmethod
    def _non_negative(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and any(w < 0 for w in weights):
            raise ValueError("style layer weights must be >= 0")
        return weights

    @model_validator(mode="after")
    def _weights_match_layers(self) -> LossConfig:
        if self.style_layer_weights is not None and len(self.style_layer_weights) != len(self.style_layers):
            raise ValueError(
                f"style_layer_weights has {len(self.style_layer_weights)} entries but style_layers has "
                f"{len(self.style_layers)}; give one weight per layer"
            )
        return self

    def layer_weights(self) -> list[float]:
        """Per-style-layer weights, defaulting to the paper's equal 1/L split."""
        if self.style_layer_weights is not None:
            return list(self.style_layer_weights)
        return [1.0 / len(self.style_layers)] * len(self.style_layers)


class OptimConfig(Section):
    """The optimiser of the image: L-BFGS (the paper's choice) or Adam."""

    name: Literal["lbfgs", "adam"] = "lbfgs"
    lr: float | None = Field(
        None, gt=0, le=1e6, description="default 1.0 for lbfgs, 4.0 for adam (pixel units, 0..255); at most 1e6"
    )
    max_iter: int = Field(1, ge=1, le=1000, description="L-BFGS loss evaluations per Trainer step")
    history_size: int = Field(20, ge=1, le=1000, description="L-BFGS history (memory and checkpoint size)")
    line_search: Literal["none", "strong_wolfe"] = "none"
    precondition_levels: int | None = Field(
        None, ge=0, le=8, description="L-BFGS only: Gaussian blurs of 1, 2, 4, ... px added to the starting inverse "
        "Hessian, so low frequencies take larger steps and fewer steps reach the same quality; 0: plain L-BFGS; "
        "default 5 for lbfgs with line_search none, else 0"
    )
    precondition_gain: float = Field(
        2.0, gt=0, le=16, description="weight growth per blur level: level k adds gain**k times its blur"
    )
    average: float | None = Field(
        None, gt=0, lt=1, description="Adam only: EMA decay of the image (e.g. 0.99); the average is the result"
    )
    cuda_graph: Union[Literal["auto"], bool] = Field(
        "auto",
        description="capture each step in one CUDA graph and replay it; auto: on for CUDA runs of the batched "
        "optimisers (not line_search=strong_wolfe), true: required (CUDA only), false: eager",
    )

    @field_validator("cuda_graph", mode="before")
    @classmethod
    def _graph_choice(cls, value: object) -> object:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"must be auto, true or false, got {value!r}")

    @model_validator(mode="after")
    def _graphable(self) -> OptimConfig:
        if self.cuda_graph is True and self.line_search == "strong_wolfe":
            raise ValueError(
                "optim.cuda_graph=true cannot capture line_search=strong_wolfe (its step count depends on the "
                "data); set optim.line_search=none or optim.cuda_graph=auto"
            )
        if self.precondition_levels and (self.name != "lbfgs" or self.line_search != "none"):
            raise ValueError(
                "optim.precondition_levels preconditions the batched L-BFGS only; set optim.precondition_levels=0 "
                "for optim.name=adam or optim.line_search=strong_wolfe"
            )
        return self

    @property
    def resolved_precondition_levels(self) -> int:
        """The configured blur levels, or the default: 5 for the batched L-BFGS (100 steps then match 300 plain
        ones, README "Time to quality"), 0 where no preconditioner applies."""
        if self.precondition_levels is not None:
            return self.precondition_levels
        return DEFAULT_PRECONDITION_LEVELS if self.name == "lbfgs" and self.line_search == "none" else 0

    @property
    def learning_rate(self) -> float:
        """The configured rate, or the optimiser's default."""
        if self.lr is not None:
            return self.lr
        return 1.0 if self.name == "lbfgs" else 4.0


class TrainerConfig(Section):
    """Arguments handed to ``lightning.Trainer``."""

    max_steps: int = Field(DEFAULT_STEPS, ge=1, description="optimisation steps")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto: bf16-mixed where the hardware has native bf16, else 32-true; 16-mixed is refused"
    )
    accelerator: str = "auto"
    devices: Union[int, str, list[int]] = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    log_every_n_steps: int = Field(
        10, ge=1, description="steps between reads of the losses and the NaN guard (losses.csv still gets every step)"
    )


class CheckpointConfig(Section):
    """Periodic checkpoints (plus ``last.ckpt``) in ``OUTPUT/checkpoints``."""

    every_n_steps: int = Field(50, ge=1)
    keep_all: bool = Field(False, description="keep every periodic checkpoint, not only the newest")


class SnapshotConfig(Section):
    """Intermediate images in ``OUTPUT/snapshots``."""

    every_n_steps: int = Field(50, ge=0, description="0 disables snapshots")


class BatchConfig(Section):
    """Runs over many content x style pairs (``content`` or ``style`` a folder, a glob or a list)."""

    images_per_device: int = Field(
        4, ge=1, le=1024, description="same-size images optimised together in one batched forward pass"
    )


class VideoConfig(Section):
    """Clips: a video file as ``content``, or a folder or glob of frames with ``enabled: true``."""

    enabled: bool = Field(False, description="a folder or glob of frames is one clip (a video file always is)")
    fps: float | None = Field(
        None, gt=0, le=1000, description="output frame rate; default the video's own rate (over every_nth_frame), 24 for frames"
    )
    temporal_weight: float = Field(
        500.0, ge=0, description="weight of the temporal loss (Ruder et al. 2016); 0 stylises frames independently"
    )
    flow: Literal["dis", "farneback"] = Field("dis", description="optical flow algorithm (OpenCV)")
    passes: int = Field(1, ge=1, le=20, description="passes over the clip, alternating direction after the first")
    init: Literal["warped", "content"] = Field(
        "warped", description="start each frame from the previous stylised frame warped by the flow, or from its content"
    )
    every_nth_frame: int = Field(1, ge=1, le=10000, description="stylise every n-th frame of the source (1 = all)")
