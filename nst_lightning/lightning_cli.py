"""``python -m nst_lightning.lightning_cli``: Lightning's own CLI over ``StyleTransferModule``.

For people who drive runs with LightningCLI YAML (``fit``, ``--trainer.*``, ``--ckpt_path last`` or a file,
``--print_config``) rather than the ``nst-lightning`` command. The model section is the module's
constructor (images as paths, settings as typed sections); a folder run adds
``--data nst_lightning.data.StylePairsDataModule``. Needs the ``cli`` extra (``jsonargparse[signatures]``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from pydantic import BaseModel, ValidationError

from .callbacks import StepCheckpoint
from .config import FeaturesConfig, ImageConfig, LossConfig, OptimConfig
from .errors import CheckpointError, ConfigError, NSTError

EXTRA_HINT = "pip install 'nst-lightning[cli]'"

CHECKPOINT_KEYWORDS = ("last", "best", "hpc")
"""``--ckpt_path`` values Lightning resolves itself (``registry...`` names too); anything else is a file."""

MODEL_SECTIONS: dict[str, type[BaseModel]] = {"loss": LossConfig, "optim": OptimConfig, "features": FeaturesConfig}
"""The module's constructor arguments that are sections of the package's schema, checked by it before the module is built."""

MODEL_IMAGE_KEYS = ("size", "style_scale")
"""The module's constructor arguments that the schema's ``image`` section defines the rules of."""

OPTION_NAMES: tuple[tuple[str, str], ...] = (
    (r"image\.(size|style_scale)", r"--model.\1"),
    (r"(loss|optim|features)\.(\w+)", r"--model.\1.\2"),
    (r"trainer\.(\w+)", r"--trainer.\1"),
    (r"(content|style|init)=(?=[\s;,]|$)", r"--model.\1"),
    (r"a new output directory", "a new --trainer.default_root_dir"),
)
"""The package's setting names in messages (regular expressions) and the LightningCLI options they become."""


def for_lightning_cli(message: str) -> str:
    """``message`` as this CLI says it: the package's keys (``image.size``) become its options (``--model.size``)."""
    for key, option in OPTION_NAMES:
        message = re.sub(rf"(?<![\w.\-]){key}", option, message)
    return message


class RootDirCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` whose ``save_dir`` defaults to the Trainer's ``default_root_dir``.

    This CLI fills the default in before the Trainer is built, so ``--trainer.default_root_dir`` moves the metrics
    and images; elsewhere an unset ``save_dir`` is the working directory, as Lightning's ``default_root_dir`` is.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(os.getcwd() if save_dir is None else save_dir, name, version, prefix, flush_logs_every_n_steps)


class StyleTransferCLI(LightningCLI):
    """LightningCLI that checks the package's settings and a ``--ckpt_path`` file before anything is built or written,
    and roots the logger and checkpoints it ships under ``--trainer.default_root_dir``."""

    checkpoint: dict[str, Any] | None = None
    """The ``--ckpt_path`` file as read, until it has been checked against the built module."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then refuse bad model settings and a ``--ckpt_path`` that is not a checkpoint, in one line each."""
        super().parse_arguments(parser, args)
        config = self.config.get(str(self.config.get("subcommand")), self.config)
        check_model_settings(config.get("model"))
        self.checkpoint = read_ckpt_path(config.get("ckpt_path"))

    def _parse_ckpt_path(self) -> None:
        """Keep the config given. Lightning's version re-parses the checkpoint's hyperparameters as ``model`` options:
        the module's include ``image_shape``, which is no constructor argument, so that parse fails; and where it
        succeeds it puts the checkpoint's settings over the given ones, so a checkpoint of another run would never be
        refused. Here the module built from the given config checks the checkpoint (``check_checkpoint``)."""

    def before_instantiate_classes(self) -> None:
        """Give the shipped logger and checkpoint callback, where their folder is unset, one under the root dir; with
        ``--trainer.enable_progress_bar false`` leave the shipped progress bar out (Lightning refuses both at once)."""
        trainer = self.config.get(str(self.subcommand), self.config).trainer
        root_run_paths(trainer)
        if trainer.get("enable_progress_bar") is False and isinstance(trainer.get("callbacks"), list):
            trainer.callbacks = [c for c in trainer.callbacks if not any(_class_specs(c, ProgressBar))]

    def after_instantiate_classes(self) -> None:
        """Refuse a ``--ckpt_path`` file of another run before the Trainer writes anything."""
        checkpoint, self.checkpoint = self.checkpoint, None
        if checkpoint is not None:
            path = self.config.get(str(self.subcommand), self.config).ckpt_path
            try:
                self.model.check_checkpoint(checkpoint)
            except CheckpointError as err:
                raise CheckpointError(f"--ckpt_path {path}: {err}") from None


def check_model_settings(model: Mapping[str, Any] | None) -> None:
    """Raise ConfigError naming the ``--model`` options whose values break the package's schema (layer names, sizes)."""
    if model is None:
        return
    checks: list[tuple[type[BaseModel], Mapping[str, Any], str]] = [
        (ImageConfig, {k: model[k] for k in MODEL_IMAGE_KEYS if model.get(k) is not None}, "--model.")
    ]
    for name, schema in MODEL_SECTIONS.items():
        value = model.get(name)
        if value is not None and hasattr(value, "as_dict"):
            value = value.as_dict()
        if isinstance(value, Mapping):
            checks.append((schema, value, f"--model.{name}."))
    problems = []
    for schema, values, prefix in checks:
        try:
            schema.model_validate(values)
        except ValidationError as err:
            problems += [
                f"{prefix}{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()
            ]
    if problems:
        raise ConfigError("; ".join(problems))


def read_ckpt_path(ckpt_path: str | None) -> dict[str, Any] | None:
    """The checkpoint a ``--ckpt_path`` file holds (None for Lightning's keywords); CheckpointError when it is none."""
    from .rundir import read_checkpoint

    if ckpt_path is None or ckpt_path in CHECKPOINT_KEYWORDS or str(ckpt_path).startswith("registry"):
        return None
    if not Path(ckpt_path).is_file():
        raise CheckpointError(
            f"--ckpt_path {ckpt_path} is not a file; give a checkpoint of this run (its checkpoints/last.ckpt) or last"
        )
    try:
        return read_checkpoint(Path(ckpt_path))
    except CheckpointError as err:
        raise CheckpointError(f"--ckpt_path {ckpt_path}: {err}") from None


def root_run_paths(trainer: Any) -> None:
    """Set unset folders under ``trainer.default_root_dir`` (the working directory when unset) in a parsed trainer
    section: ``RootDirCSVLogger``'s ``save_dir`` and ``StepCheckpoint``'s ``dirpath`` (``ROOT/checkpoints``, one
    folder for all versions, so ``--ckpt_path last`` finds the previous run's ``last.ckpt``)."""
    root = trainer.get("default_root_dir") or os.getcwd()
    for spec in _class_specs(trainer.get("logger"), RootDirCSVLogger):
        if spec.init_args.get("save_dir") is None:
            spec.init_args.save_dir = str(root)
    for spec in _class_specs(trainer.get("callbacks"), StepCheckpoint):
        if spec.init_args.get("dirpath") is None:
            spec.init_args.dirpath = os.path.join(root, "checkpoints")


def _class_specs(value: Any, cls: type) -> Iterator[Any]:
    """The ``class_path``/``init_args`` entries in ``value`` (one or a list) that name ``cls`` or a subclass of it."""
    for spec in value if isinstance(value, list) else [value]:
        class_path = getattr(spec, "class_path", None)
        if not isinstance(class_path, str) or "init_args" not in spec:
            continue
        module, _, name = class_path.rpartition(".")
        found = getattr(import_module(module), name, None)
        if isinstance(found, type) and issubclass(found, cls):
            yield spec


def main(args: Sequence[str] | None = None) -> Any:
    """Run LightningCLI over ``StyleTransferModule`` (any LightningDataModule as ``--data``) and return it; a
    one-line error (exit code 2) when the ``cli`` extra is missing and for the package's own errors."""
    from .cli import EXIT_USAGE, echo_error

    if find_spec("jsonargparse") is None or find_spec("docstring_parser") is None:
        echo_error(f"LightningCLI needs jsonargparse[signatures], which is not installed; {EXTRA_HINT}")
        raise SystemExit(EXIT_USAGE)
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # notices for Lightning's code, not for its users
    from .module import StyleTransferModule

    try:
        return StyleTransferCLI(
            StyleTransferModule,
            None,
            auto_configure_optimizers=False,  # the module brings its own (batched L-BFGS or Adam)
            save_config_kwargs={"overwrite": True},  # a continued run rewrites the config it ran with
            args=None if args is None else list(args),
        )
    except NSTError as err:
        echo_error(for_lightning_cli(str(err)))
        raise SystemExit(EXIT_USAGE) from None


if __name__ == "__main__":
    from nst_lightning.lightning_cli import main as run  # the imported module, whose classes the YAML's class paths name

    run()
