"""Reliability II: one run per folder, a loss history that survives damage, one-line errors on every write path,
resumable sweeps, refusals that name the fix, and warnings about inputs used in unexpected ways.

Failing disks are simulated at the file API (``open``, ``os.open``, ``os.mkdir``, ...) for paths under one
folder, so the package's own code meets the errors a full or read-only disk gives; everything else is real.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nst_lightning.config import EXAMPLE_CONTENT, load_config
from nst_lightning.history import read_history

from .conftest import ROOT, tiny_overrides
from .test_cli import assert_one_line_error, invoke

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _fit_args(output: Path, steps: int = 4, **extra: object) -> list[str]:
    return ["fit", "-q", *_sets(tiny_overrides(output, steps, **extra))]


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _steps(losses: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in losses.read_text().splitlines()[1:]]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run (4 steps, checkpoints every 2 steps), written once; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = invoke(*_fit_args(out, 4))
    assert result.exit_code == 0, result.output
    return out


def _copy(run: Path, where: Path) -> Path:
    target = where / "run"
    shutil.copytree(run, target)
    return target


# --- failing disks, simulated at the file API ------------------------------------------------------------------


class FailingDisk:
    """Make writes under ``root`` fail with ``code`` (read-only: every create, rename, remove; full: data writes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, code: int, only: str = "") -> None:
        self.root, self.code, self.only = str(root.resolve()), code, only
        real_open, real_os_open = io.open, os.open

        def hit(path) -> bool:
            try:
                text = os.path.abspath(os.fspath(path))
            except TypeError:
                return False
            return text.startswith(self.root) and self.only in text

        def fail(path):
            raise OSError(code, os.strerror(code), os.fspath(path))

        wall = code != errno.ENOSPC  # read-only, no permission, a file in the path: nothing can be created

        def fake_open(file, mode="r", *args, **kwargs):
            if any(m in mode for m in "wax+") and hit(file):
                if wall:
                    fail(file)
                return _FullFile(real_open(file, mode, *args, **kwargs))
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            if wall and hit(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                fail(path)
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr("builtins.open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        if wall:
            for name in ("mkdir", "unlink", "rmdir", "replace", "rename"):
                real = getattr(os, name)
                monkeypatch.setattr(os, name, self._guard(real, hit, fail))

    @staticmethod
    def _guard(real, hit, fail):
        def guarded(path, *args, **kwargs):
            if hit(path):
                fail(path)
            return real(path, *args, **kwargs)

        return guarded


class _FullFile:
    """A file whose writes fail as a full disk's do: no space left, no file name."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


# --- one run per folder -----------------------------------------------------------------------------------------


def test_two_fits_started_at_the_same_instant_exactly_one_runs(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    driver = (
        "import os, sys, time\n"
        "from nst_lightning.cli import app\n"
        "import nst_lightning.api\n"  # everything imported first, so both reach the start line together
        f"open(os.path.join({str(tmp_path)!r}, 'ready-' + str(os.getpid())), 'w').close()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
        "sys.argv = ['nst-lightning', *sys.argv[1:]]\n"
        "app()\n"
    )
    procs = {
        seed: subprocess.Popen(
            [sys.executable, "-c", driver, *_fit_args(out, 6, seed=seed)],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in (1, 2)
    }
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready-*"))) < 2:
        assert all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline, "a driver failed"
        time.sleep(0.01)
    go.touch()
    results = {seed: (p.wait(timeout=600), *p.communicate()) for seed, p in procs.items()}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], results
    winner = next(seed for seed, (code, _, _) in results.items() if code == 0)
    loser_err = next(err for code, _, err in results.values() if code == 2)
    lines = loser_err.strip().splitlines()
    assert len(lines) == 1 and f"in use by another nst-lightning run (pid {procs[winner].pid} " in lines[0], loser_err
    assert f"seed: {winner}" in (out / "config.yaml").read_text()
    assert _steps(out / "losses.csv") == [0, 1, 2, 3, 4, 5, 6]
    assert _step(out / "checkpoints" / "last.ckpt") == 6
    assert not list(out.rglob(".*")), "no lock or temporary file is left behind"


def test_the_lock_names_its_holder_and_a_crashed_holders_lock_is_taken_over(tmp_path):
    from nst_lightning.errors import ConfigError
    from nst_lightning.lock import FolderLock

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from nst_lightning.lock import FolderLock\n"
         f"FolderLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by another nst-lightning run \(pid {holder.pid} on "):
            FolderLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup runs, the lock file stays
        holder.wait()
    assert (tmp_path / ".nst-lightning.lock").is_file()
    with FolderLock(tmp_path):
        assert f"pid {os.getpid()} " in (tmp_path / ".nst-lightning.lock").read_text()
    assert not (tmp_path / ".nst-lightning.lock").exists()


def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    result = invoke(*_fit_args(tmp_path / "new", 2, content=str(tmp_path / "missing.jpg")))
    assert_one_line_error(result, "missing.jpg does not exist")
    assert not (tmp_path / "new").exists()


# --- history that survives damage -------------------------------------------------------------------------------


def test_a_stray_line_in_the_history_costs_only_that_line_on_resume(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    original = (run / "losses.csv").read_text() + "garbage,x\n"
    (run / "losses.csv").write_text(original)
    result = invoke(*_fit_args(run, 6), "--resume", "last")
    assert result.exit_code == 0, result.output
    assert _steps(run / "losses.csv") == [0, 1, 2, 3, 4, 5, 6]
    assert (run / "losses.damaged.csv").read_text() == original
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "kept 5 valid rows, dropped 1 damaged line(s) (7)" in warnings[0], result.stderr


def test_a_history_that_cannot_be_parsed_is_kept_aside_not_truncated(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    (run / "losses.csv").write_bytes(b"\x00\xff garbage header\n1,2,3\n")
    result = invoke(*_fit_args(run, 6), "--resume", "last")
    assert result.exit_code == 0, result.output
    assert (run / "losses.damaged.csv").read_bytes() == b"\x00\xff garbage header\n1,2,3\n"
    assert _steps(run / "losses.csv") == [4, 5, 6]  # rows from the resume point on; the lost ones are kept aside


def test_reading_a_history_keeps_every_valid_row(tmp_path):
    path = tmp_path / "losses.csv"
    path.write_text(
        "step,content,style,tv,loss\n1,0,2,0,2\n2,0.5,1,0,1.5\nnot,a,row\n2,9,9,9,9\n3,0.1,0.2,0,0.3\n4,0.1,0."
    )
    history = read_history(path)
    assert [r["step"] for r in history.rows] == [1, 2, 3]
    assert history.dropped == [4, 5, 7]
    assert history.rows[1] == {"step": 2, "content": 0.5, "style": 1.0, "smoothness": 0.0, "loss": 1.5}


def test_a_history_written_with_the_old_tv_column_is_read_and_a_resume_rewrites_it_with_the_smoothness_column(
    finished_run, tmp_path
):
    run = _copy(finished_run, tmp_path)
    rows = (run / "losses.csv").read_text().splitlines()
    assert rows[0] == "step,content,style,smoothness,loss"
    (run / "losses.csv").write_text("\n".join(["step,content,style,tv,loss", *rows[1:]]) + "\n")
    assert [r["smoothness"] for r in read_history(run / "losses.csv").rows] == [float(r.split(",")[3]) for r in rows[1:]]
    result = invoke(*_fit_args(run, 6), "--resume", "last")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    resumed = (run / "losses.csv").read_text().splitlines()
    assert resumed[0] == "step,content,style,smoothness,loss" and resumed[1:5] == rows[1:5]
    assert _steps(run / "losses.csv") == list(range(0, 7)) and not (run / "losses.damaged.csv").exists()


# --- write failures: one line, exit 2, nothing good removed ---------------------------------------------------


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_last_one(finished_run, tmp_path, monkeypatch):
    run = _copy(finished_run, tmp_path)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    FailingDisk(monkeypatch, run / "checkpoints", errno.ENOSPC, only=".ckpt")
    result = invoke(*_fit_args(run, 8), "--resume", "last")
    assert_one_line_error(result, "(No space left on device); free disk space")
    assert "checkpoints/" in result.stderr and "holds step 4: continue with --resume last" in result.stderr
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not list(run.rglob(".*.tmp"))


@pytest.mark.parametrize("code, fix", [(errno.EROFS, "read-only"), (errno.EACCES, "permissions")])
def test_a_run_into_a_folder_it_cannot_write_is_one_line(tmp_path, monkeypatch, code, fix):
    out = tmp_path / "walled" / "run"
    out.mkdir(parents=True)
    FailingDisk(monkeypatch, out, code)
    result = invoke(*_fit_args(out, 2))
    assert_one_line_error(result, fix)
    assert str(out) in result.stderr


def _raising(real, root: Path, code: int):
    def call(path, *args, **kwargs):
        if os.path.abspath(os.fspath(path)).startswith(str(root)):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real(path, *args, **kwargs)

    return call


def test_a_read_only_folder_never_loses_the_finished_run(finished_run, tmp_path, monkeypatch):
    run = _copy(finished_run, tmp_path)
    before = _files(run)
    FailingDisk(monkeypatch, run, errno.EROFS)
    result = invoke(*_fit_args(run, 4), "--overwrite")
    assert_one_line_error(result, "Read-only file system")
    assert _files(run) == before


def test_export_under_a_file_or_onto_a_read_only_disk_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    for target in (blocker / "x.onnx", blocker / "sub" / "x.onnx"):
        result = invoke("export", "--output", str(target))
        assert_one_line_error(result, "a part of the path is a file, not a folder")
    assert blocker.read_text() == "keep me"
    ro = tmp_path / "ro"
    ro.mkdir()
    FailingDisk(monkeypatch, ro, errno.EROFS)
    result = invoke("export", "--output", str(ro / "x.onnx"))
    assert_one_line_error(result, f"cannot write {ro} (Read-only file system)")


def test_a_failed_cleanup_never_hides_the_write_error(tmp_path, monkeypatch):
    from nst_lightning.atomic import write_text_atomic

    FailingDisk(monkeypatch, tmp_path, errno.ENOSPC)
    monkeypatch.setattr(os, "unlink", _raising(os.unlink, tmp_path, errno.EROFS))
    with pytest.raises(OSError) as err:
        write_text_atomic(tmp_path / "a.txt", "text")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "a.txt")


def test_a_folder_run_onto_a_read_only_disk_is_one_line_before_any_work(tmp_path, monkeypatch):
    contents = tmp_path / "contents"
    contents.mkdir()
    shutil.copy(EXAMPLE_CONTENT, contents / "a.jpg")
    out = tmp_path / "ro"
    out.mkdir()
    FailingDisk(monkeypatch, out, errno.EROFS)
    result = invoke(*_fit_args(out / "batch", 2, content=str(contents)))
    assert_one_line_error(result, "Read-only file system")


def test_a_full_disk_in_the_middle_of_a_folder_run_is_one_line_and_keeps_the_images_written(tmp_path, monkeypatch):
    contents = tmp_path / "contents"
    contents.mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(EXAMPLE_CONTENT, contents / name)
    out = tmp_path / "batch"
    FailingDisk(monkeypatch, out, errno.ENOSPC, only="b__")  # the disk fills up when b's image is written
    result = invoke(*_fit_args(out, 2, content=str(contents), **{"batch.images_per_device": 1}))
    assert_one_line_error(result, f"cannot write {out / 'b__starry_night.png'} (No space left on device); free disk space")
    assert "images already written are kept and a rerun skips them" in result.stderr
    assert (out / "a__starry_night.png").is_file() and not (out / "b__starry_night.png").exists()


def test_a_folder_run_with_a_missing_style_is_refused_up_front(tmp_path):
    contents = tmp_path / "contents"
    contents.mkdir()
    shutil.copy(EXAMPLE_CONTENT, contents / "a.jpg")
    result = invoke(*_fit_args(tmp_path / "out", 2, content=str(contents), style=str(tmp_path / "gone.jpg")))
    assert_one_line_error(result, f"style image {tmp_path / 'gone.jpg'} does not exist")
    assert not (tmp_path / "out").exists()


# --- refusals with the fix ------------------------------------------------------------------------------------


def test_resuming_below_the_checkpoints_step_is_refused_and_changes_nothing(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    before = _files(run)
    result = invoke(*_fit_args(run, 3), "--resume", "last")
    assert_one_line_error(result, "is at step 4, past trainer.max_steps=3; set it to 4 or more")
    assert _files(run) == before


def test_resume_with_overwrite_is_refused(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    before = _files(run)
    result = invoke(*_fit_args(run, 6), "--resume", "last", "--overwrite")
    assert_one_line_error(result, "--resume continues the run and --overwrite replaces it")
    assert _files(run) == before


def test_a_run_killed_before_its_first_checkpoint_points_both_ways_to_overwrite(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    (run / "final.png").unlink()
    for extra in ([], ["--resume", "last"]):
        result = invoke(*_fit_args(run, 4), *extra)
        assert_one_line_error(result, "stopped before its first checkpoint")
        assert "--overwrite" in result.stderr
    assert invoke(*_fit_args(run, 4), "--overwrite").exit_code == 0
    assert _step(run / "checkpoints" / "last.ckpt") == 4


def test_a_successful_resume_removes_the_interrupted_image(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    shutil.copy(run / "final.png", run / "interrupted.png")  # as a stop at step 4 leaves it
    assert invoke(*_fit_args(run, 6), "--resume", "last").exit_code == 0
    assert not (run / "interrupted.png").exists() and (run / "final.png").is_file()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"init": "random"}, "init 'random' is none of content, noise, style"),
        ({"optim.name": "adam", "optim.lr": "1e39"}, "optim.lr"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, extra, fragment):
    result = invoke(*_fit_args(tmp_path / "run", 2, **extra))
    assert_one_line_error(result, fragment)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_reported_as_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    result = invoke(*_fit_args(tmp_path / "run", 2, content=str(tmp_path / "pipe.png")))
    assert_one_line_error(result, "is not a regular file")


# --- warnings about inputs used in unexpected ways ------------------------------------------------------------


def test_tiny_stretched_and_animated_inputs_are_warned_about(tmp_path):
    from PIL import Image

    from nst_lightning.api import input_warnings

    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (5, 5), (200, 40, 40)).save(tiny)
    mask = tmp_path / "mask.png"
    Image.new("L", (40, 10), 255).save(mask)
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (64, 64), c) for c in ((0, 0, 0), (255, 255, 255))]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    config = load_config(None, tiny_overrides(tmp_path / "run", 2, content=str(tiny), style=str(gif)))
    config = config.model_copy(update={"style_masks": [str(mask)]})
    lines = input_warnings(config)
    assert len(lines) == 3, lines
    assert "has 2 frames (animated or multi-page); only the first is used" in lines[0]
    assert "is 5x5 px and is enlarged 10x to image.size=48" in lines[1]
    assert "style mask" in lines[2] and "is stretched" in lines[2]
    plain = load_config(None, tiny_overrides(tmp_path / "run", 2))
    assert input_warnings(plain) == []


def test_a_warning_through_the_command_is_one_line(tmp_path):
    from PIL import Image

    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (5, 5), (200, 40, 40)).save(tiny)
    result = invoke(*_fit_args(tmp_path / "run", 1, content=str(tiny)))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.search(r"5x5 px and is enlarged \d+x", warnings[0]), result.stderr


# --- sweeps: Ctrl-C exits 130 with the command that continues, --resume keeps finished cells ----------------


def test_ctrl_c_in_a_sweep_exits_130_and_resume_finishes_only_the_unfinished_cells(tmp_path):
    out = tmp_path / "sweep"
    args = [
        "sweep", "-q", *_sets(tiny_overrides(out, 4, **{"image.size": 32})),
        "--grid", "trainer.max_steps=4,40", "--cell-px", "32",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nst_lightning", *args],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    second = out / "cells" / "01" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not second.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "interrupted by SIGINT" in last and "continue the sweep with: nst-lightning sweep" in last
    command = last.split("continue the sweep with: ")[1].split()
    assert command[-1] == "--resume" and command[1] == "sweep"
    first = (out / "cells" / "00" / "final.png").read_bytes()
    stopped_at = _step(second)
    assert stopped_at < 40

    again = invoke(*command[1:])
    assert again.exit_code == 0, again.output
    assert (out / "cells" / "00" / "final.png").read_bytes() == first, "a finished cell is kept, not rerun"
    assert _step(second) == 40 and _steps(out / "cells" / "01" / "losses.csv") == list(range(0, 41))
    assert (out / "sweep.csv").is_file() and (out / "contact_sheet.png").is_file()


def test_a_previous_sweep_is_refused_with_both_ways_out(tmp_path):
    (tmp_path / "sweep" / "cells").mkdir(parents=True)
    args = ["sweep", *_sets(tiny_overrides(tmp_path / "sweep", 2)), "--grid", "seed=1,2"]
    assert_one_line_error(invoke(*args), "add --resume to finish its unfinished cells, --overwrite to replace it")
    assert_one_line_error(invoke(*args, "--resume", "--overwrite"), "give one of them, not both")


# --- random damage to a run folder: resume continues or refuses in one line, never losing intact work ---------

DAMAGEABLE = (
    "config.yaml", "final.png", "losses.csv", "loss_curve.png", "side_by_side.png",
    "checkpoints/last.ckpt", "checkpoints/step-000004.ckpt", "snapshots/step_000003.png",
)
KEPT = ("checkpoints/last.ckpt", "checkpoints/step-000004.ckpt", "final.png", "snapshots/step_000003.png")


def _damage(run: Path, name: str, how: str, cut: float, noise: bytes) -> None:
    path = run / name
    if how == "missing":
        path.unlink(missing_ok=True)
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])
    elif how == "garbage":
        path.write_bytes(noise)
    elif how == "appended":
        with path.open("ab") as fh:
            fh.write(noise)
    else:  # a stray temporary file, as a killed writer leaves it
        (path.parent / f".{path.name}.99999-1.tmp").write_bytes(noise)


def test_resume_after_random_damage_continues_or_refuses_in_one_line(finished_run, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    damage = st.lists(
        st.tuples(
            st.sampled_from(DAMAGEABLE),
            st.sampled_from(["missing", "truncated", "garbage", "appended", "stray"]),
            st.floats(0.0, 0.99),
            st.binary(min_size=0, max_size=64),
        ),
        min_size=1,
        max_size=3,
        unique_by=lambda d: d[0],
    )

    @settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(damage)
    def check(damages):
        run = _copy(finished_run, tmp_path_factory.mktemp("damaged"))
        for name, how, cut, noise in damages:
            _damage(run, name, how, cut, noise)
        damaged = {name for name, how, *_ in damages if how != "stray"}
        before = {name: (run / name).read_bytes() for name in KEPT if name not in damaged and (run / name).exists()}
        result = invoke(*_fit_args(run, 6), "--resume", "last")
        if result.exit_code == 0:
            assert _step(run / "checkpoints" / "last.ckpt") == 6
            assert (run / "final.png").is_file() and not list(run.rglob(".*.tmp"))
            assert _steps(run / "losses.csv")[-2:] == [5, 6]
        else:
            assert_one_line_error(result, "")
            after = {name: (run / name).read_bytes() for name in before if (run / name).exists()}
            assert after == before, f"intact files changed by a refused resume: {damages}"

    check()
