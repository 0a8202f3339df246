"""Real signals and kills sent to the command where the single-run tests do not reach: a clip's middle frame, a
folder of clips, and the change from one coarse-to-fine stage to the next.

Each stop exits as shells report it (130 for SIGINT, 143 for SIGTERM) and says how to continue; continuing keeps
every finished frame byte for byte and ends with all of them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nst_lightning.images import read_image

from .conftest import ROOT, tiny_overrides
from .test_faults import _steps, _wait_for

pytest.importorskip("av")
pytest.importorskip("cv2")

from .test_video import pan, write_clip  # noqa: E402

FRAME_STEPS = 40
"""Steps per frame at 32 px: about a second a frame, so a signal sent when frame 1 lands arrives inside frame 2."""


def _fit(items: list[str], *flags: str) -> subprocess.Popen[str]:
    """``nst-lightning fit -q`` in its own process with these ``--set`` items."""
    args = [a for item in items for a in ("--set", item)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "nst_lightning", "fit", "-q", *flags, *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _frames(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob("*.png"))}


@pytest.mark.parametrize(
    "kind, signum, code",
    [("clip", signal.SIGTERM, 143), ("clips", signal.SIGINT, 130)],
    ids=["sigterm-mid-clip", "sigint-in-a-folder-of-clips"],
)
def test_a_signal_at_a_clips_middle_frame_exits_as_shells_say_and_continuing_keeps_finished_frames(
    tmp_path, kind, signum, code
):
    clips = tmp_path / "clips"
    clips.mkdir()
    write_clip(clips / "a.mp4", pan(3))
    if kind == "clips":
        write_clip(clips / "b.mp4", pan(2))
    out = tmp_path / "out"
    items = tiny_overrides(out, FRAME_STEPS, **{"content": clips / "a.mp4" if kind == "clip" else clips, "image.size": 32})
    frames = out / "frames" if kind == "clip" else out / "a__starry_night" / "frames"
    proc = _fit(items)
    _wait_for(lambda: (frames / "000001.png").is_file(), proc, timeout=300)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr and f"interrupted by {signal.Signals(signum).name}" in last
    assert re.search(r"frame 2/3|between frames", last), stderr  # in frame 2's steps, or as it was set up
    assert "--resume last" in last if kind == "clip" else "rerun the same command" in last
    kept = _frames(frames)
    assert sorted(kept) == ["000001.png"]

    resumed = _fit(items, *(["--resume", "last"] if kind == "clip" else []))
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert {name: v for name, v in _frames(frames).items() if name in kept} == kept
    assert sorted(_frames(frames)) == ["000001.png", "000002.png", "000003.png"]
    assert (frames.parent / "stylised.mp4").is_file()
    if kind == "clips":
        assert len(list((out / "b__starry_night" / "frames").glob("*.png"))) == 2


def test_a_run_killed_as_it_changes_stage_resumes_into_the_next_stage_and_ends_with_one_history(tmp_path):
    out = tmp_path / "run"
    items = tiny_overrides(
        out, 40, **{"scales": "[32,48]", "scale_steps": "[4,40]", "checkpoint.every_n_steps": 4, "snapshot.every_n_steps": 0}
    )
    first = out / "checkpoints" / "stage1" / "last.ckpt"

    def first_stage_done() -> bool:
        try:
            return torch.load(first, map_location="cpu", weights_only=True)["global_step"] == 4
        except Exception:  # not written yet, or being replaced
            return False

    proc = _fit(items)
    _wait_for(first_stage_done, proc, timeout=300)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "stage2" / "last.ckpt").exists()  # killed before the next stage's first checkpoint

    resumed = _fit(items, "--resume", "last")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    final = read_image(out / "final.png")
    assert final.shape[-2:] == (48, 48) and final.std() > 0.05
    assert torch.load(out / "checkpoints" / "stage2" / "last.ckpt", weights_only=True)["global_step"] == 40
    assert _steps(out / "losses.csv") == list(range(0, 45))


OUTSIDE_A_STEP = """
import os, signal, sys
from pathlib import Path
from nst_lightning import api, runs
from nst_lightning.config import load_config

signum, where = getattr(signal, sys.argv[1]), sys.argv[2]
config = load_config(None, sys.argv[3:])
real = getattr(runs, where)
calls = []

def then_signal(*args, **kwargs):  # the signal arrives right after the first frame is saved / as stage 2 loads
    calls.append(1)
    if where == "load_images" and len(calls) == 2:
        os.kill(os.getpid(), signum)
    out = real(*args, **kwargs)
    if where == "save_image" and len(calls) == 1:
        os.kill(os.getpid(), signum)
    return out

setattr(runs, where, then_signal)
try:
    api.run(config, progress=False)
except api.RunInterrupted as err:
    print(f"stopped {err.signum} {err.resumable}: {err}")
setattr(runs, where, real)
print("resumed", api.run(config, resume="last", progress=False).root)
"""


@pytest.mark.parametrize(
    "signame, where, extra",
    [
        ("SIGTERM", "save_image", {"content": "clip"}),
        ("SIGINT", "load_images", {"scales": "[32,40]", "scale_steps": "[2,2]", "image.size": 40}),
    ],
    ids=["sigterm-as-a-frame-is-saved", "sigint-as-a-stage-loads"],
)
def test_a_signal_outside_any_step_stops_the_run_in_one_line_that_a_resume_continues(tmp_path, signame, where, extra):
    if extra.get("content") == "clip":
        extra = {"content": write_clip(tmp_path / "a.mp4", pan(2))}
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-c", OUTSIDE_A_STEP, signame, where, *tiny_overrides(out, 2, **{"image.size": 32, **extra})],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    stopped, resumed = run.stdout.strip().splitlines()[-2:]
    between = "between frames" if where == "save_image" else "between steps"
    assert stopped.startswith(f"stopped {int(getattr(signal, signame))} True: interrupted by {signame} {between}"), stopped
    assert resumed == f"resumed {out}"
    assert (out / "stylised.mp4").is_file() if where == "save_image" else read_image(out / "final.png").shape[-1] == 40
