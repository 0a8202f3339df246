"""One run per output folder, for every run kind: a folder another run holds is refused in one line before anything
is written, and what the holder wrote is left as it was; inputs and outputs behind a loop of symbolic links are
refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from nst_lightning.lock import FolderLock

from .conftest import tiny_overrides
from .test_batch import make_frames
from .test_cli import assert_one_line_error, invoke


def _kinds(tmp_path: Path) -> dict[str, list[str]]:
    frames = tmp_path / "frames"
    make_frames(frames, 2)
    kinds = {"image": [], "stages": ["scales=[32, 48]", "scale_steps=[1, 1]"], "folder": [f"content={frames}"]}
    try:
        from .test_video import pan, write_clip
    except pytest.skip.Exception:
        return kinds
    clips = tmp_path / "clips"
    clips.mkdir()
    write_clip(clips / "a.mp4", pan(2))
    kinds |= {"clip": [f"content={clips / 'a.mp4'}"], "clips": [f"content={clips}"]}
    return kinds


def test_every_run_kind_refuses_a_folder_another_run_holds_and_leaves_its_files(tmp_path):
    out = tmp_path / "held"
    out.mkdir()
    (out / "theirs.txt").write_text("the holder's file")
    with FolderLock(out):
        for kind, extra in _kinds(tmp_path).items():
            items = [*tiny_overrides(out, steps=1), *extra]
            result = invoke("fit", *[a for item in items for a in ("--set", item)])
            assert_one_line_error(result, f"output {out} is in use by another nst-lightning run")
            assert sorted(p.name for p in out.iterdir()) == [".nst-lightning.lock", "theirs.txt"], kind
    assert (out / "theirs.txt").read_text() == "the holder's file"


def test_a_loop_of_symbolic_links_as_an_input_or_the_output_is_refused_by_name(tmp_path):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    for key, value in [("content", tmp_path / "loop1"), ("style", f"[{tmp_path / 'loop2'}]"), ("output", tmp_path / "loop1" / "x")]:
        result = invoke("fit", "--set", f"{key}={value}", "--set", "trainer.max_steps=1")
        assert_one_line_error(result, "runs into a loop of symbolic links")
        assert key in result.stderr


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


HELD = {
    "image": "a single-image run",
    "folder": "a run over a folder of images",
    "clip": "a clip run",
    "clips": "a run over a folder of clips",
    "sweep": "a sweep",
}


def test_a_folder_holding_another_kind_of_run_is_named_with_how_to_continue_it_and_left_as_it_was(tmp_path):
    kinds = _kinds(tmp_path)
    kinds.pop("stages")  # an image run too
    grid = ["--grid", "loss.style_weight=1e3,1e4"]
    folders: dict[str, Path] = {}
    for kind, extra in [*kinds.items(), ("sweep", [])]:
        folders[kind] = tmp_path / f"held-{kind}"
        items = [a for item in [*tiny_overrides(folders[kind], steps=2), *extra] for a in ("--set", item)]
        result = invoke("sweep", *items, *grid) if kind == "sweep" else invoke("fit", *items)
        assert result.exit_code == 0, result.output
    for held, folder in folders.items():
        before = _files(folder)
        for kind, extra in kinds.items():
            if kind == held:
                continue
            items = [a for item in [*tiny_overrides(folder, steps=2), *extra] for a in ("--set", item)]
            for flags in ([], ["--resume", "last"], ["--overwrite"]):
                if kind in ("folder", "clips") and flags == ["--resume", "last"]:
                    continue  # folders continue by running again, and say so
                result = invoke("fit", *items, *flags)
                assert_one_line_error(result, f"output {folder} holds {HELD[held]}, not {HELD[kind]}")
                assert "--resume" in result.stderr if held in ("image", "clip", "sweep") else "again" in result.stderr
        if held != "sweep":
            items = [a for item in tiny_overrides(folder, steps=2) for a in ("--set", item)]
            result = invoke("sweep", *items, *grid, "--resume")
            assert_one_line_error(result, f"output {folder} holds {HELD[held]}, not a sweep")
        assert _files(folder) == before, held


def test_a_folder_of_clips_summarised_before_summaries_named_their_unit_is_still_told_by_its_clips(tmp_path):
    from nst_lightning.kinds import held_kind

    (tmp_path / "batch-summary.json").write_text('{"total": 1, "results": []}')
    assert held_kind(tmp_path) == "folder"
    (tmp_path / "a__s").mkdir()
    (tmp_path / "a__s" / "clip.json").write_text("{}")
    assert held_kind(tmp_path) == "clips"
