"""Content x style pairs as Lightning data: groups of same-size pairs served step by step to ``Trainer.fit``.

A group is the images a device optimises together; the data yields one ``GroupStep`` per optimisation step
of each group (the first one carries the loaded images and, for an interrupted group, its checkpoint).
In a distributed run every rank takes its own share of the groups, so every output is written exactly
once and nothing is averaged between ranks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from .config import RunConfig
from .errors import ConfigError, NSTError
from .images import Loading, load_image, load_style, read_size, target_shape
from .pairs import Pair, expand_pairs, pending
from .sections import DEFAULT_STEPS

@dataclass
class PairResult:
    """What became of one pair on one rank: ``done`` (file written) or ``failed`` (with the reason).

    ``loss`` is the total loss of the written image, unscaled, as losses.csv reports it for single runs.
    """

    name: str
    content: str
    styles: list[str]
    output: str
    rank: int
    status: str
    error: str | None = None
    loss: float | None = None
    seconds: float = 0.0


class PairItem(NamedTuple):
    """A pair with its loaded images, or the one-line reason it could not be loaded."""

    pair: Pair
    content: torch.Tensor | None
    styles: list[torch.Tensor] | None
    error: str | None


def probe_shape(path: str, size: int, fit: str, rounding: str = "round") -> tuple[int, int] | None:
    """The ``(H, W)`` an image will have once loaded, read from its header only; None if unreadable.

    Only used to group same-size images, so a wrong guess costs speed, never correctness.
    """
    try:
        height, width = read_size(path)
    except NSTError:  # unreadable files are reported when the pair is loaded
        return None
    return target_shape(height, width, size, fit, rounding)


def load_pair(
    pair: Pair, size: int, fit: str, style_scale: float | Sequence[float], loading: Loading = Loading()
) -> PairItem:
    """Load a pair as a single run would: content at ``size``, styles at ``style_scale`` (one, or one per style) of its long side."""
    scales = list(style_scale) if isinstance(style_scale, Sequence) else [style_scale] * len(pair.styles)
    try:
        content = load_image(pair.content, size, fit, loading)
        shape = tuple(content.shape[-2:])
        styles = [load_style(path, shape, scale, loading) for path, scale in zip(pair.styles, scales)]
    except NSTError as err:
        return PairItem(pair, None, None, str(err))
    return PairItem(pair, content, styles, None)


def group_by_shape(shapes: Sequence[tuple[int, int] | None], max_group: int, world_size: int = 1) -> list[list[int]]:
    """Indices of same-shape items in groups of at most ``max_group``, balanced over ``world_size`` ranks.

    Each shape's items are split into a multiple of ``world_size`` groups (when there are enough) of sizes
    differing by at most one, so every rank gets a similar share. Unknown shapes form groups of one.
    """
    buckets: dict[tuple[int, int] | int, list[int]] = {}
    for i, shape in enumerate(shapes):
        buckets.setdefault(shape if shape is not None else -1 - i, []).append(i)
    groups = []
    for members in buckets.values():
        count = math.ceil(len(members) / max_group)
        count = min(len(members), math.ceil(count / world_size) * world_size)
        base, extra = divmod(len(members), count)
        start = 0
        for k in range(count):
            end = start + base + (1 if k < extra else 0)
            groups.append(members[start:end])
            start = end
    return groups


def _everyones(value: int, world_size: int) -> list[int]:
    """``value`` of every rank (one ``all_gather_object``, outside any step)."""
    import torch.distributed as dist

    gathered: list[int | None] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return [int(v) for v in gathered if v is not None]


def _as_is(batch: Any) -> Any:
    return batch


class GroupStep(NamedTuple):
    """One optimisation step of one group of pairs, as the data hands it to the module."""

    group: int
    step: int
    """1-based step within the group."""
    steps: int
    pairs: list[Pair]
    checkpoint: str
    """Where the group's state is saved while it runs (removed once its images are written)."""
    items: list[PairItem] | None = None
    """The loaded images, on the group's first step only."""
    resume: dict[str, Any] | None = None
    """The saved state of an interrupted group, on its first step only."""
    save: bool = False
    """Whether the group's state is saved after this step (every ``checkpoint_every`` steps but the last)."""

    @property
    def first(self) -> bool:
        return self.items is not None

    @property
    def idle(self) -> bool:
        """A step with no pairs: a rank whose share is done keeps stepping with the others (see ``GroupSteps.pad_to``)."""
        return not self.pairs

    @property
    def last(self) -> bool:
        return self.step == self.steps


def group_checkpoint(folder: str | Path, pairs: Sequence[Pair]) -> Path:
    """The checkpoint file of a group: named by its members, so a rerun finds it whatever the rank."""
    key = hashlib.sha1("\n".join(sorted(p.name for p in pairs)).encode()).hexdigest()[:12]
    return Path(folder) / f"group-{key}.ckpt"


def read_group_checkpoint(path: Path) -> dict[str, Any] | None:
    """A group's saved state, or None when there is none or it is unreadable (the group then starts again)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged group checkpoint costs its progress, never the run
        return None
    return state if isinstance(state, dict) and "step" in state else None


class GroupSteps(IterableDataset):
    """This rank's groups, step by step; images are loaded (and checkpoints read) at each group's first step."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        groups: Sequence[Sequence[int]],
        steps: int,
        checkpoints: str | Path,
        size: int,
        fit: str,
        style_scale: float | Sequence[float],
        loading: Loading = Loading(),
        checkpoint_every: int = 0,
    ) -> None:
        self.pairs = list(pairs)
        self.checkpoint_every = checkpoint_every
        self.groups = [list(g) for g in groups]
        self.steps = steps
        self.checkpoints = Path(checkpoints)
        self.size, self.fit, self.style_scale, self.loading = size, fit, style_scale, loading
        self.starts = []
        for group in self.groups:
            saved = read_group_checkpoint(group_checkpoint(self.checkpoints, [self.pairs[i] for i in group]))
            self.starts.append(min(int(saved["step"]), steps - 1) if saved else 0)
        self.idle_steps = 0

    def working_steps(self) -> int:
        """The steps this rank's groups take (an interrupted group only its remaining ones)."""
        return sum(self.steps - start for start in self.starts)

    def pad_to(self, total: int) -> None:
        """End with idle steps up to ``total``: with several ranks, Lightning exchanges a stop flag at every step,
        so a rank that finished its share early would wait there for ever while another waits for it in the
        final gather. Every rank is padded to the longest share."""
        self.idle_steps = max(0, total - self.working_steps())

    def __len__(self) -> int:
        return self.working_steps() + self.idle_steps

    def images(self) -> int:
        """How many images this rank's groups hold (progress bars count images, not steps)."""
        return sum(len(g) for g in self.groups)

    def __iter__(self) -> Iterator[GroupStep]:
        for index, (group, start) in enumerate(zip(self.groups, self.starts)):
            pairs = [self.pairs[i] for i in group]
            path = group_checkpoint(self.checkpoints, pairs)
            for step in range(start + 1, self.steps + 1):
                save = bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and step < self.steps
                item = GroupStep(index, step, self.steps, pairs, str(path), save=save)
                if step == start + 1:
                    loaded = [load_pair(p, self.size, self.fit, self.style_scale, self.loading) for p in pairs]
                    item = item._replace(items=loaded, resume=read_group_checkpoint(path) if start else None)
                yield item
        for step in range(1, self.idle_steps + 1):
            yield GroupStep(-1, step, self.idle_steps, [], "")


class StylePairsDataModule(L.LightningDataModule):
    """Serves content x style pairs to ``Trainer.fit`` as groups of same-size images, ``steps`` steps each.

    Args:
        pairs: the pairs to produce (see ``nst_lightning.pairs.expand_pairs``); or None, and the pairs of
            ``content`` x ``style`` written into ``output``.
        content, style: a file, folder, glob or list of them each, as in a config (used when ``pairs`` is None).
        output: the folder each pair's ``<content>__<style>.png`` is written to (used when ``pairs`` is None).
        overwrite: with ``content``/``style``, redo pairs whose output exists (skipped otherwise, as a rerun would).
        steps: optimisation steps per image.
        size, fit, style_scale: image sizes, as in the config's ``image`` section.
        loading: resampling, rounding and style fit (``images.Loading``), as in the ``image`` section.
        images_per_device: the largest group optimised together.
        checkpoints: folder of the groups' checkpoints (an interrupted group resumes from its own); default
            ``OUTPUT/checkpoints``, or ``checkpoints`` for given pairs.
        checkpoint_every: save the running group every this many steps (0: only when stopped by a signal).
    """

    def __init__(
        self,
        pairs: Sequence[Pair] | None = None,
        *,
        content: str | list[str] | None = None,
        style: str | list[str] | None = None,
        output: str | None = None,
        overwrite: bool = False,
        steps: int = DEFAULT_STEPS,
        size: int = 512,
        fit: Literal["long", "height", "width"] = "long",
        style_scale: float | Sequence[float] = 1.0,
        loading: Loading = Loading(),
        images_per_device: int = 4,
        checkpoints: str | Path | None = None,
        checkpoint_every: int = 0,
    ) -> None:
        super().__init__()
        if pairs is None:
            if content is None or style is None or output is None:
                raise ConfigError("StylePairsDataModule needs pairs=, or content=, style= and output=")
            pairs = pending(expand_pairs(RunConfig(content=content, style=style, output=output)), overwrite)[0]
        self.save_hyperparameters(ignore=["pairs"])
        self.pairs = list(pairs)
        self.steps = steps
        self.size, self.fit, self.style_scale, self.loading = size, fit, style_scale, loading
        self.images_per_device = images_per_device
        default = Path(output) / "checkpoints" if output is not None else Path("checkpoints")
        self.checkpoints = Path(checkpoints) if checkpoints is not None else default
        self.checkpoint_every = checkpoint_every
        self.dataset: GroupSteps | None = None

    @classmethod
    def from_config(
        cls, config: RunConfig, pairs: Sequence[Pair], images_per_device: int | None = None
    ) -> StylePairsDataModule:
        """The data module for ``pairs`` with the config's steps, image sizes and batching; checkpoints in OUTPUT/checkpoints."""
        return cls(
            pairs,
            steps=config.trainer.max_steps,
            size=config.image.size,
            fit=config.image.fit,
            style_scale=config.image.style_scale,
            loading=Loading(**config.image.loading()),
            images_per_device=images_per_device or config.batch.images_per_device,
            checkpoints=Path(config.output) / "checkpoints",
            checkpoint_every=config.checkpoint.every_n_steps,
        )

    def setup(self, stage: str) -> None:
        """Group the pairs (every rank uses rank 0's list) and keep this rank's share of the groups."""
        world_size, rank = 1, 0
        if self.trainer is not None:
            self.pairs = self.trainer.strategy.broadcast(self.pairs, src=0)
            world_size, rank = self.trainer.world_size, self.trainer.global_rank
        shapes = [probe_shape(p.content, self.size, self.fit, self.loading.rounding) for p in self.pairs]
        groups = group_by_shape(shapes, self.images_per_device, world_size)
        mine = groups[rank::world_size]
        self.dataset = GroupSteps(
            self.pairs, mine, self.steps, self.checkpoints, self.size, self.fit, self.style_scale, self.loading,
            self.checkpoint_every,
        )
        if world_size > 1:
            self.dataset.pad_to(max(_everyones(self.dataset.working_steps(), world_size)))

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("fit")
        return DataLoader(self.dataset, batch_size=None, collate_fn=_as_is)
