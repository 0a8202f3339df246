"""Pairs as Lightning data: same-size groups balanced over ranks, shapes read from headers, failed loads kept."""

from __future__ import annotations

import pytest
from PIL import Image

from nst_lightning.data import StylePairsDataModule, group_by_shape, probe_shape
from nst_lightning.images import load_image
from nst_lightning.pairs import Pair


@pytest.mark.parametrize(
    ("n", "max_group", "world", "sizes"),
    [
        (4, 4, 1, [4]),
        (4, 4, 2, [2, 2]),
        (10, 4, 2, [3, 3, 2, 2]),
        (3, 8, 4, [1, 1, 1]),
        (5, 1, 2, [1, 1, 1, 1, 1]),
    ],
)
def test_same_size_groups_are_capped_and_balanced_over_ranks(n, max_group, world, sizes):
    groups = group_by_shape([(32, 48)] * n, max_group, world)
    assert [len(g) for g in groups] == sizes
    assert sorted(i for g in groups for i in g) == list(range(n))


def test_only_same_shapes_share_a_group_and_unknown_shapes_stand_alone():
    shapes = [(32, 32), (32, 48), (32, 32), None, None, (32, 48)]
    groups = group_by_shape(shapes, max_group=8)
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 5], [3], [4]]


def test_probe_reads_the_loaded_shape_from_the_header_including_exif_rotation(tmp_path):
    plain, rotated = tmp_path / "plain.jpg", tmp_path / "rotated.jpg"
    Image.new("RGB", (60, 40), "red").save(plain)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 40), "red").save(rotated, exif=exif)
    for path in (plain, rotated):
        assert probe_shape(str(path), 30, "long") == tuple(load_image(path, 30).shape[-2:])
    assert probe_shape(str(rotated), 30, "long") == (30, 20)
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    assert probe_shape(str(tmp_path / "junk.jpg"), 30, "long") is None


def test_a_pair_that_cannot_load_is_served_with_its_reason(tmp_path):
    good, bad, style = tmp_path / "good.png", tmp_path / "bad.png", tmp_path / "style.png"
    Image.new("RGB", (40, 40), "blue").save(good)
    Image.new("RGB", (40, 40), "green").save(style)
    bad.write_bytes(b"")
    pairs = [Pair(str(p), (str(style),), str(tmp_path / f"{p.stem}__style.png")) for p in (good, bad)]
    data = StylePairsDataModule(pairs, steps=3, size=32, style_scale=0.5, images_per_device=2,
                                checkpoints=tmp_path / "checkpoints")
    steps = list(data.train_dataloader())  # the unreadable image has no known shape: a group of its own
    assert [(s.group, s.step, s.first, s.last) for s in steps] == [
        (g, k, k == 1, k == 3) for g in (0, 1) for k in (1, 2, 3)
    ]
    items = [item for s in steps if s.first for item in s.items]
    by_name = {item.pair.name: item for item in items}
    assert by_name["good__style.png"].content.shape == (1, 3, 32, 32)
    assert by_name["good__style.png"].styles[0].shape == (1, 3, 16, 16)
    assert by_name["bad__style.png"].content is None and "empty file" in by_name["bad__style.png"].error
