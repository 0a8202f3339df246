"""The run configuration: a typed schema, YAML load/save, ``--set`` overrides and cross-field checks.

Imports neither torch nor lightning, so ``--help``, ``print-config`` and config errors answer at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError
from .kinds import RunKind, run_kind
from .layers import LAYER_NAMES, canonical_layer

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLE_CONTENT = EXAMPLES_DIR / "astronaut.jpg"
EXAMPLE_STYLE = EXAMPLES_DIR / "starry_night.jpg"
EXAMPLE_STYLE_2 = EXAMPLES_DIR / "the_scream.jpg"

DEFAULT_STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
INIT_KEYWORDS = ("content", "noise", "style")
MAX_IMAGE_SIZE = 16384
MAX_CHECKPOINT_BLOCKS = 4
"""VGG blocks that end in a pooling layer before relu5_1, the ones activation checkpointing can cover."""

PositiveFloat = Field(gt=0)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ImageConfig(_Section):
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


class FeaturesConfig(_Section):
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


class LossConfig(_Section):
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


class OptimConfig(_Section):
    """The optimiser of the image: L-BFGS (the paper's choice) or Adam."""

    name: Literal["lbfgs", "adam"] = "lbfgs"
    lr: float | None = Field(
        None, gt=0, le=1e6, description="default 1.0 for lbfgs, 4.0 for adam (pixel units, 0..255); at most 1e6"
    )
    max_iter: int = Field(1, ge=1, le=1000, description="L-BFGS loss evaluations per Trainer step")
    history_size: int = Field(20, ge=1, le=1000, description="L-BFGS history (memory and checkpoint size)")
    line_search: Literal["none", "strong_wolfe"] = "none"
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
        return self

    @property
    def learning_rate(self) -> float:
        """The configured rate, or the optimiser's default."""
        if self.lr is not None:
            return self.lr
        return 1.0 if self.name == "lbfgs" else 4.0


class TrainerConfig(_Section):
    """Arguments handed to ``lightning.Trainer``."""

    max_steps: int = Field(300, ge=1)
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


class CheckpointConfig(_Section):
    """Periodic checkpoints (plus ``last.ckpt``) in ``OUTPUT/checkpoints``."""

    every_n_steps: int = Field(50, ge=1)
    keep_all: bool = Field(False, description="keep every periodic checkpoint, not only the newest")


class SnapshotConfig(_Section):
    """Intermediate images in ``OUTPUT/snapshots``."""

    every_n_steps: int = Field(50, ge=0, description="0 disables snapshots")


class BatchConfig(_Section):
    """Runs over many content x style pairs (``content`` or ``style`` a folder, a glob or a list)."""

    images_per_device: int = Field(
        4, ge=1, le=1024, description="same-size images optimised together in one batched forward pass"
    )


class VideoConfig(_Section):
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


class RunConfig(_Section):
    """One style-transfer run: inputs, output directory and every setting."""

    content: Union[str, list[str]] = Field(
        str(EXAMPLE_CONTENT), description="content image path, or a folder, a glob or a list of them (one output each)"
    )
    style: Union[str, list[str]] = Field(
        str(EXAMPLE_STYLE),
        description="style image path, a list of files blended into one style, or a folder or glob (one output each)",
    )
    output: str = Field("runs/example", description="run directory: final.png, snapshots, checkpoints")
    seed: int = 0
    init: str = Field("content", description="content | noise | style | path to an image")
    style_blend: list[float] | None = Field(None, description="weight of each style image; default equal")
    style_masks: list[Optional[str]] | None = Field(
        None, description="one mask image per style (white = apply it there), or null for the whole image"
    )
    color: Literal["none", "luminance", "histogram"] = Field(
        "none", description="none: the style's colours | luminance: keep the content's | histogram: recolour the style"
    )
    scales: list[int] | None = Field(None, description="coarse-to-fine output sizes; the last is image.size")
    scale_steps: list[int] | None = Field(None, description="steps at each scale; default trainer.max_steps each")
    scale_init: Literal["upsample", "detail"] = Field(
        "upsample", description="how each later scale starts: the previous result upsampled, or that plus the content's "
        "detail finer than the previous scale (detail)"
    )
    image: ImageConfig = Field(default_factory=ImageConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    snapshot: SnapshotConfig = Field(default_factory=SnapshotConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)

    @field_validator("content", "style")
    @classmethod
    def _some_images(cls, images: str | list[str], info: ValidationInfo) -> str | list[str]:
        if isinstance(images, list) and not images:
            raise ValueError(f"give at least one {info.field_name} image")
        return images

    @field_validator("style_blend")
    @classmethod
    def _blend_weights(cls, blend: list[float] | None) -> list[float] | None:
        if blend is not None and (any(b < 0 for b in blend) or sum(blend) <= 0):
            raise ValueError("style_blend weights must be >= 0 and sum to more than 0, e.g. [0.7, 0.3]")
        return blend

    @field_validator("scales")
    @classmethod
    def _increasing_scales(cls, scales: list[int] | None) -> list[int] | None:
        if scales is None:
            return None
        if not scales or any(s < 16 for s in scales) or any(a >= b for a, b in zip(scales, scales[1:])):
            raise ValueError("scales must be increasing sizes of at least 16 px, e.g. [256, 512]")
        return scales

    @field_validator("scale_steps")
    @classmethod
    def _positive_steps(cls, steps: list[int] | None) -> list[int] | None:
        if steps is not None and any(s < 1 for s in steps):
            raise ValueError("scale_steps must be at least 1 each")
        return steps

    @model_validator(mode="before")
    @classmethod
    def _size_from_scales(cls, data: Any) -> Any:
        """Without ``image.size``, the output size is the last scale: given as input, not written into a built config."""
        scales = data.get("scales") if isinstance(data, dict) else None
        if not (isinstance(scales, list) and scales and isinstance(scales[-1], int)):
            return data
        image = data.get("image") or {}
        if isinstance(image, ImageConfig):
            if "size" in image.model_fields_set:
                return data
            image = image.model_dump(exclude_unset=True)
        if not isinstance(image, dict) or "size" in image:
            return data
        return {**data, "image": {**image, "size": scales[-1]}}

    @model_validator(mode="after")
    def _compatible(self) -> RunConfig:
        if self.trainer.precision == "16-mixed":
            raise ValueError(
                "trainer.precision=16-mixed is not supported (the optimisers run without AMP's gradient scaler, "
                "which fp16 needs); use bf16-mixed or 32-true"
            )
        if self.optim.cuda_graph is True and self.trainer.accelerator == "cpu":
            raise ValueError(
                "optim.cuda_graph=true needs a CUDA run but trainer.accelerator=cpu; set trainer.accelerator=gpu "
                "or optim.cuda_graph=auto"
            )
        if self.optim.cuda_graph is True and self.loss.style_loss == "w2":
            raise ValueError(
                "optim.cuda_graph=true cannot capture loss.style_loss=w2 (its eigenvalue solver checks its result on "
                "the host every step); set optim.cuda_graph=auto, which runs w2 steps eagerly"
            )
        if self.optim.average is not None and self.optim.name != "adam":
            raise ValueError(
                "optim.average (iterate averaging) needs optim.name=adam; L-BFGS converges without it, "
                "so drop optim.average or set optim.name=adam"
            )
        n = len(self.styles)
        for key, value in [
            ("style_blend", self.style_blend),
            ("style_masks", self.style_masks),
            ("image.style_scale", self.image.style_scale),
        ]:
            if isinstance(value, list) and len(value) != n:
                raise ValueError(f"{key} has {len(value)} entries for {n} style image(s); give one per style")
        self._check_scales()
        return self

    def _check_scales(self) -> None:
        if self.scale_steps is not None and self.scales is None:
            raise ValueError("scale_steps needs scales; set scales too, e.g. scales=[256, 512]")
        if self.scales is None:
            return
        if self.scale_steps is not None and len(self.scale_steps) != len(self.scales):
            raise ValueError(
                f"scale_steps has {len(self.scale_steps)} entries for {len(self.scales)} scales; give one per scale"
            )
        if self.image.size != self.scales[-1]:
            raise ValueError(
                f"scales end at {self.scales[-1]} but image.size is {self.image.size}; the last scale is the "
                f"output size, so end scales with {self.image.size} or set image.size={self.scales[-1]}"
            )

    def stages(self) -> list[tuple[int, int]]:
        """``(size, steps)`` of each coarse-to-fine stage; one stage at ``image.size`` without ``scales``."""
        if self.scales is None:
            return [(self.image.size, self.trainer.max_steps)]
        steps = self.scale_steps or [self.trainer.max_steps] * len(self.scales)
        return list(zip(self.scales, steps))

    def style_scales(self) -> list[float]:
        """The ``style_scale`` of each style image."""
        scale = self.image.style_scale
        return list(scale) if isinstance(scale, list) else [scale] * len(self.styles)

    @property
    def kind(self) -> RunKind:
        """The run this config describes: ``image``, ``folder`` (of images), ``clip`` or ``clips`` (a folder of clips)."""
        return run_kind(self.contents, self.styles, isinstance(self.content, list), self.video.enabled)

    @property
    def contents(self) -> list[str]:
        """The content entries (files, folders or globs) as a list."""
        return [self.content] if isinstance(self.content, str) else list(self.content)

    @property
    def styles(self) -> list[str]:
        """The style image paths as a list."""
        return [self.style] if isinstance(self.style, str) else list(self.style)


_INPUT_PATH_KEYS = ("content", "style", "init", "style_masks")


def _relative_to(base: Path, value: Any) -> Any:
    if isinstance(value, list):
        return [_relative_to(base, v) for v in value]
    if isinstance(value, str) and value not in INIT_KEYWORDS and not os.path.isabs(os.path.expanduser(value)):
        return str((base / value).resolve())
    return value


def _resolve_file_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Input paths written in a YAML file are relative to that file's folder."""
    for key in _INPUT_PATH_KEYS:
        if key in raw:
            raw[key] = _relative_to(base, raw[key])
    feats = raw.get("features")
    if isinstance(feats, dict) and isinstance(feats.get("weights"), str):
        if feats["weights"] not in ("caffe", "torchvision"):
            feats["weights"] = _relative_to(base, feats["weights"])
    if isinstance(feats, dict) and isinstance(feats.get("onnx"), str):
        feats["onnx"] = _relative_to(base, feats["onnx"])
    return raw


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice; keep one", key_node.start_mark
                )
            try:
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
        return super().construct_mapping(node, deep=deep)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``key.sub=value`` into its key path and YAML-parsed value."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r} is not of the form key.sub=value (e.g. --set image.size=256)")
    try:
        value = yaml.load(text, Loader=UniqueKeyLoader) if text.strip() else ""
    except yaml.YAMLError as err:
        if text.lstrip()[:1] in ("[", "{", "'", '"'):  # meant as YAML (a list, a mapping, a quoted string)
            problem = getattr(err, "problem", None) or "malformed YAML"
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({problem}); close its brackets or quotes, "
                f"e.g. --set '{key}=[a.png, b.png]'"
            ) from None
        value = text
    return key.split("."), value


def set_value(raw: dict[str, Any], path: list[str], value: Any, source: str) -> None:
    """Set ``raw[path[0]][path[1]]... = value``, creating sections; ``source`` names the override in errors."""
    node = raw
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(path[: depth + 1])
            raise ConfigError(f"{source}: {dotted} is a value, not a section; set {dotted}=... instead")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set key.sub=value`` items to a raw config mapping, in order."""
    for item in overrides:
        path, value = parse_override(item)
        set_value(raw, path, value, f"--set {item!r}")
    return raw


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(_key(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; " + _known_keys_hint(e["loc"])
        parts.append(f"{loc}: {msg}")
    return f"invalid config ({source}): " + "; ".join(parts)


def _key(part: Any) -> str:
    """A key as written, or quoted when it holds line breaks or other unprintable characters."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def _known_keys_hint(loc: tuple[Any, ...]) -> str:
    from difflib import get_close_matches

    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model = ann
    names = list(model.model_fields)
    close = get_close_matches(str(loc[-1]), names, n=1)
    prefix = f"did you mean {close[0]!r}? " if close else ""
    return f"{prefix}valid keys here: {', '.join(names)}"


def build_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a raw mapping into a RunConfig, turning schema errors into one-line ConfigErrors."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for missing, unreadable or malformed files."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist; check the path (shipped configs are in configs/)")
    if p.is_dir():
        raise ConfigError(f"config path {p} is a directory; give a YAML file such as configs/example.yaml")
    try:
        text = p.read_text(encoding="utf-8")
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except RecursionError:
        raise ConfigError(f"config {p} nests too deeply; write it as a flat mapping of sections") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config {p}: {err}; give a readable UTF-8 YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise ConfigError(f"config {p} is not valid YAML{where}: {problem}; fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {p} must be a mapping of keys (content:, style:, ...), not {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults), apply ``--set`` overrides, and validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    try:
        if path is not None:
            raw = _resolve_file_paths(read_yaml(path), Path(path).resolve().parent)
            source = str(path)
        raw = apply_overrides(raw, list(overrides or []))
        return build_config(raw, source)
    except RecursionError:
        raise ConfigError(
            f"config ({source}) refers to itself (a YAML alias inside its own anchor) or nests too deeply; "
            "write the values out"
        ) from None


def dump_config(config: RunConfig) -> str:
    """The config as YAML text, every key present."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def all_layers(config: RunConfig) -> list[str]:
    """Every layer the loss needs, in network order."""
    wanted = set(config.loss.content_layers) | set(config.loss.style_layers)
    return [name for name in LAYER_NAMES if name in wanted]
