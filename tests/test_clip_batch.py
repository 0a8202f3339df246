"""Folders of clips: each clip x style pair in its own folder, clips shared out over ranks, reruns continue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from nst_lightning.config import load_config
from nst_lightning.errors import ConfigError, RunInterrupted
from nst_lightning.pairs import expand_pairs, is_batch, is_clip, is_clip_batch

from .conftest import ROOT, tiny_overrides

pytest.importorskip("av")
pytest.importorskip("cv2")

from nst_lightning import fit_clips  # noqa: E402

from .test_video import _SignalAtFrame, pan, write_clip  # noqa: E402


def clips_folder(tmp: Path, lengths: dict[str, int]) -> Path:
    folder = tmp / "clips"
    folder.mkdir()
    for name, count in lengths.items():
        write_clip(folder / f"{name}.mp4", pan(count))
    return folder


def test_a_folder_glob_or_list_of_videos_is_a_clip_batch_and_one_video_is_a_clip(tmp_path):
    folder = clips_folder(tmp_path, {"b": 2, "a": 2})
    one = load_config(None, [f"content={folder / 'a.mp4'}"])
    assert is_clip(one) and not is_clip_batch(one) and not is_batch(one)
    for content in (str(folder), f"{folder}/*.mp4", f"[{folder / 'a.mp4'}, {folder / 'b.mp4'}]"):
        config = load_config(None, [f"content={content}", f"output={tmp_path / 'out'}"])
        assert is_clip_batch(config) and not is_clip(config) and not is_batch(config)
        pairs = expand_pairs(config, clips=True)
        assert [Path(p.output).name for p in pairs] == ["a__starry_night", "b__starry_night"]
    frames = load_config(None, [f"content={folder}", "video.enabled=true"])
    assert is_clip(frames) and not is_clip_batch(frames)


def test_a_folder_of_both_videos_and_images_is_refused_naming_it(tmp_path):
    folder = clips_folder(tmp_path, {"a": 2})
    (folder / "still.png").write_bytes((ROOT / "docs" / "example.jpg").read_bytes())
    with pytest.raises(ConfigError, match="holds both video files and images"):
        expand_pairs(load_config(None, [f"content={folder}"]), clips=True)


def test_two_cpu_ranks_share_the_clips_each_written_once_a_bad_one_reported_and_a_rerun_skips_them(tmp_path):
    folder = clips_folder(tmp_path, {"a": 2, "b": 3, "c": 2})
    (folder / "d.mp4").write_bytes(b"not a video")
    out = tmp_path / "out"
    settings = tiny_overrides(out, steps=2, content=folder, **{"image.size": 32, "trainer.devices": 2})
    args = [sys.executable, "-m", "nst_lightning", "fit", "-q", *[a for s in settings for a in ("--set", s)]]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 1, r.stderr  # some clips failed
    assert "4 clips: 3 written, 0 already complete (skipped), 1 failed" in r.stdout
    assert "failed d__starry_night: cannot read video" in r.stdout
    summary = json.loads((out / "batch-summary.json").read_text())
    assert summary["world_size"] == 2
    ranks = {x["name"]: x["rank"] for x in summary["results"]}
    assert ranks == {"a__starry_night": 0, "b__starry_night": 1, "c__starry_night": 0, "d__starry_night": 1}
    for name, frames in {"a": 2, "b": 3, "c": 2}.items():
        clip = out / f"{name}__starry_night"
        assert sorted(p.name for p in (clip / "frames").iterdir()) == [f"{i:06d}.png" for i in range(1, frames + 1)]
        assert (clip / "stylised.mp4").is_file() and not (clip / "work").exists()
    assert not (out / "d__starry_night").exists()  # refused before anything of it was written

    (folder / "d.mp4").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "3 clips: 0 written, 3 already complete (skipped), 0 failed" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before


class _StopAtFrame(Callback):
    """Stops the run at the start of the ``frame``-th frame it sees (1-based), as a user's callback may."""

    def __init__(self, frame: int) -> None:
        self.frame, self.seen = frame, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen += 1
        if self.seen == self.frame:
            trainer.should_stop = True


def test_an_interrupted_clip_batch_says_rerun_and_the_rerun_continues_the_clip_at_its_first_unfinished_frame(tmp_path):
    folder = clips_folder(tmp_path, {"a": 3, "b": 2})
    config = load_config(None, tiny_overrides(tmp_path / "out", steps=2, content=folder, **{"image.size": 32}))
    with pytest.raises(RunInterrupted, match="a__starry_night: frame 3/3") as stopped:
        fit_clips(config, progress=False, callbacks=[_SignalAtFrame(3)])
    assert not stopped.value.resumable and "rerun the same command" in stopped.value.hint
    a = tmp_path / "out" / "a__starry_night"
    kept = {p.name: p.stat().st_mtime_ns for p in (a / "frames").iterdir()}
    assert sorted(kept) == ["000001.png", "000002.png"] and not (a / "stylised.mp4").exists()

    report = fit_clips(config, progress=False, callbacks=[_StopAtFrame(1)])  # a user's callback ends clip a early
    assert [(r.name, r.status) for r in report.results] == [("a__starry_night", "failed"), ("b__starry_night", "done")]
    assert "stopped by a callback" in report.failed[0].error

    report = fit_clips(config, progress=False)
    assert [r.name for r in report.done] == ["a__starry_night"] and report.skipped == ["b__starry_night"]
    assert {p.name: p.stat().st_mtime_ns for p in (a / "frames").iterdir() if p.name in kept} == kept
    assert (a / "frames" / "000003.png").is_file() and (a / "stylised.mp4").is_file()


def test_a_clip_batch_is_refused_by_fit_and_fit_clip_names_fit_clips(tmp_path):
    from nst_lightning import fit

    folder = clips_folder(tmp_path, {"a": 2})
    with pytest.raises(ConfigError, match="fit_clips"):
        fit(load_config(None, [f"content={folder}", f"output={tmp_path / 'o'}"]))
