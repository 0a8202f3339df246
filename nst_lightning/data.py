"""Content x style pairs as Lightning data: groups of same-size pairs and a LightningDataModule serving them.

One dataset item is one group, the images a device optimises together. In a distributed run Lightning's
predict sampler (``UnrepeatedDistributedSampler``) hands each rank its own groups without repeating any,
so every output is written exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .config import RunConfig
from .errors import NSTError
from .images import Loading, load_image, load_style, read_size, target_shape
from .pairs import Pair

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


def _as_is(batch: Any) -> Any:
    return batch


class StylePairsDataset(Dataset):
    """Groups of pairs; item ``i`` loads group ``i``'s images (a failed load is reported, not raised)."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        groups: Sequence[Sequence[int]],
        size: int,
        fit: str,
        style_scale: float | Sequence[float],
        loading: Loading = Loading(),
    ):
        self.pairs = list(pairs)
        self.groups = [list(g) for g in groups]
        self.size, self.fit, self.style_scale, self.loading = size, fit, style_scale, loading

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[PairItem]:
        return [load_pair(self.pairs[i], self.size, self.fit, self.style_scale, self.loading) for i in self.groups[index]]

    def group_size(self, index: int) -> int:
        """How many pairs group ``index`` holds (progress bars count images, not groups)."""
        return len(self.groups[index])


class StylePairsDataModule(L.LightningDataModule):
    """Serves content x style pairs to ``trainer.predict`` as groups of same-size images.

    Args:
        pairs: the pairs to produce (see ``nst_lightning.pairs.expand_pairs``).
        size, fit, style_scale: image sizes, as in the config's ``image`` section.
        loading: resampling, rounding and style fit (``images.Loading``), as in the ``image`` section.
        images_per_device: the largest group optimised together.
        num_workers: DataLoader workers loading images.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        *,
        size: int = 512,
        fit: str = "long",
        style_scale: float | Sequence[float] = 1.0,
        loading: Loading = Loading(),
        images_per_device: int = 4,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.pairs = list(pairs)
        self.size, self.fit, self.style_scale, self.loading = size, fit, style_scale, loading
        self.images_per_device = images_per_device
        self.num_workers = num_workers
        self.dataset: StylePairsDataset | None = None

    @classmethod
    def from_config(
        cls, config: RunConfig, pairs: Sequence[Pair], images_per_device: int | None = None
    ) -> StylePairsDataModule:
        """The data module for ``pairs`` with the config's image sizes and batching."""
        return cls(
            pairs,
            size=config.image.size,
            fit=config.image.fit,
            style_scale=config.image.style_scale,
            loading=Loading(**config.image.loading()),
            images_per_device=images_per_device or config.batch.images_per_device,
        )

    def setup(self, stage: str) -> None:
        """Group the pairs for this run's world size; every rank uses rank 0's list, so they shard the same list."""
        world_size = 1
        if self.trainer is not None:
            self.pairs = self.trainer.strategy.broadcast(self.pairs, src=0)
            world_size = self.trainer.world_size
        shapes = [probe_shape(p.content, self.size, self.fit, self.loading.rounding) for p in self.pairs]
        groups = group_by_shape(shapes, self.images_per_device, world_size)
        self.dataset = StylePairsDataset(self.pairs, groups, self.size, self.fit, self.style_scale, self.loading)

    def predict_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("predict")
        return DataLoader(self.dataset, batch_size=None, shuffle=False, num_workers=self.num_workers, collate_fn=_as_is)
