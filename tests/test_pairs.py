"""Batch inputs: folders, globs and lists expand to named content x style pairs; finished pairs are skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from nst_lightning.config import EXAMPLE_STYLE, load_config
from nst_lightning.errors import ConfigError
from nst_lightning.pairs import expand_pairs, is_batch, pending


def touch(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / n for n in names]
    for p in paths:
        p.write_bytes(b"x")
    return paths


def config(tmp_path: Path, **keys: object):
    return load_config(None, [f"output={tmp_path / 'out'}", *[f"{k}={v}" for k, v in keys.items()]])


def test_a_single_content_and_style_file_is_not_a_batch(tmp_path):
    assert not is_batch(config(tmp_path))
    assert not is_batch(config(tmp_path, style="[a.jpg, b.jpg]"))


def test_a_folder_expands_to_its_images_in_name_order_with_pair_names(tmp_path):
    touch(tmp_path / "photos", "b.jpg", "a.png", "notes.txt", ".hidden.jpg")
    (tmp_path / "photos" / "sub").mkdir()
    cfg = config(tmp_path, content=tmp_path / "photos")
    assert is_batch(cfg)
    pairs = expand_pairs(cfg)
    assert [Path(p.content).name for p in pairs] == ["a.png", "b.jpg"]
    assert [p.name for p in pairs] == ["a__starry_night.png", "b__starry_night.png"]
    assert all(Path(p.output).parent == tmp_path / "out" and p.styles == (str(EXAMPLE_STYLE),) for p in pairs)


def test_every_content_meets_every_style_of_a_folder_or_glob(tmp_path):
    touch(tmp_path / "c", "x.jpg", "y.jpg")
    touch(tmp_path / "s", "wave.jpg", "scream.png")
    cfg = config(tmp_path, content=f"'{tmp_path}/c/*.jpg'", style=tmp_path / "s")
    names = sorted(p.name for p in expand_pairs(cfg))
    assert names == ["x__scream.png", "x__wave.png", "y__scream.png", "y__wave.png"]


def test_a_content_list_mixes_files_folders_and_globs_without_duplicates(tmp_path):
    a, b = touch(tmp_path / "c", "a.jpg", "b.jpg")
    (d,) = touch(tmp_path / "d", "d.jpg")
    cfg = config(tmp_path, content=f"[{a}, '{tmp_path}/c/*.jpg', {tmp_path / 'd'}]")
    assert [Path(p.content).name for p in expand_pairs(cfg)] == ["a.jpg", "b.jpg", "d.jpg"]


def test_a_style_list_of_files_stays_one_blended_style(tmp_path):
    touch(tmp_path / "c", "a.jpg")
    s1, s2 = touch(tmp_path / "s", "one.jpg", "two.jpg")
    (pair,) = expand_pairs(config(tmp_path, content=tmp_path / "c", style=f"[{s1}, {s2}]"))
    assert pair.styles == (str(s1), str(s2)) and pair.name == "a__one+two.png"


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        (lambda t: {"content": t / "empty"}, "content folder .* holds no images"),
        (lambda t: {"content": f"'{t}/nowhere/*.jpg'"}, "content glob .* matches no images"),
        (
            lambda t: {"content": t / "c", "style": f"[{t / 's'}, a.jpg]"},
            "is a folder or glob, but a style list is blended",
        ),
        (lambda t: {"content": t / "clash"}, "would both write .*a__starry_night.png; rename one"),
    ],
)
def test_bad_batch_inputs_raise_one_line_errors(tmp_path, keys, fragment):
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "c", "a.jpg")
    touch(tmp_path / "s", "s.jpg")
    touch(tmp_path / "clash", "a.jpg", "a.png")
    with pytest.raises(ConfigError, match=fragment) as err:
        expand_pairs(config(tmp_path, **keys(tmp_path)))
    assert "\n" not in str(err.value)


def test_an_output_folder_among_the_inputs_is_refused(tmp_path):
    touch(tmp_path / "out", "a.jpg")
    with pytest.raises(ConfigError, match="inside the output folder"):
        expand_pairs(config(tmp_path, content=tmp_path / "out"))


def test_finished_outputs_are_skipped_unless_overwriting(tmp_path):
    touch(tmp_path / "c", "a.jpg", "b.jpg")
    pairs = expand_pairs(config(tmp_path, content=tmp_path / "c"))
    touch(tmp_path / "out", pairs[1].name)
    todo, done = pending(pairs)
    assert todo == [pairs[0]] and done == [pairs[1]]
    assert pending(pairs, overwrite=True) == (pairs, [])


def test_yaml_content_folders_and_globs_are_relative_to_the_file(tmp_path):
    touch(tmp_path / "frames", "f1.png", "f2.png")
    f = tmp_path / "cfg" / "batch.yaml"
    f.parent.mkdir()
    f.write_text(f"content: ['../frames/*.png']\noutput: {tmp_path / 'out'}\n")
    assert [p.name for p in expand_pairs(load_config(f))] == ["f1__starry_night.png", "f2__starry_night.png"]
