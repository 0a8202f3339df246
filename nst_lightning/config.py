"""The run configuration: ``RunConfig`` (the sections of ``sections`` and the checks across them), YAML
load/save and ``--set`` overrides.

Imports neither torch nor lightning, so ``--help``, ``print-config`` and config errors answer at once.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError
from .kinds import RunKind, run_kind
from .layers import LAYER_NAMES
from .sections import (
    DEFAULT_STYLE_LAYERS,
    EXAMPLE_CONTENT,
    EXAMPLE_STYLE,
    EXAMPLE_STYLE_2,
    EXAMPLES_DIR,
    INIT_KEYWORDS,
    MAX_CHECKPOINT_BLOCKS,
    MAX_IMAGE_SIZE,
    MIN_TILE,
    BatchConfig,
    CheckpointConfig,
    FeaturesConfig,
    ImageConfig,
    LossConfig,
    OptimConfig,
    Section,
    SnapshotConfig,
    TrainerConfig,
    VideoConfig,
)

__all__ = [
    "DEFAULT_STYLE_LAYERS", "EXAMPLES_DIR", "EXAMPLE_CONTENT", "EXAMPLE_STYLE", "EXAMPLE_STYLE_2", "INIT_KEYWORDS",
    "MAX_CHECKPOINT_BLOCKS", "MAX_IMAGE_SIZE", "MIN_TILE", "BatchConfig", "CheckpointConfig", "FeaturesConfig",
    "ImageConfig", "LossConfig", "OptimConfig", "RunConfig", "SnapshotConfig", "TrainerConfig", "VideoConfig",
    "all_layers", "apply_overrides", "build_config", "dump_config", "load_config", "parse_override", "read_yaml",
    "set_value",
]

class RunConfig(Section):
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

    @field_validator("content", "style", "style_masks", "init", "output")
    @classmethod
    def _no_symlink_loop(cls, value: Any, info: ValidationInfo) -> Any:
        for path in value if isinstance(value, list) else [value]:
            if path is not None and symlink_loop(path):
                raise ValueError(
                    f"{path} runs into a loop of symbolic links; point the link at a real file or folder, or give "
                    f"the {info.field_name} path itself"
                )
        return value

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
        if isinstance(self.features.tile, int) and self.loss.style_loss == "w2":
            raise ValueError(
                f"features.tile={self.features.tile} cannot evaluate loss.style_loss=w2 by tiles (its covariance root "
                "is not a sum over positions); set features.tile=off, or a Gram style loss such as relative"
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


def symlink_loop(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (or a folder on the way to it) is a loop of symbolic links, which no read or write survives."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    return False


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
