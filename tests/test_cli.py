"""The command line end to end: fast help, real runs, resume, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import CONFIGS, ROOT, tiny_overrides

EXE = [sys.executable, "-m", "nst_lightning"]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_help_answers_fast_without_importing_torch():
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from typer.testing import CliRunner\n"
        "from nst_lightning.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0 and 'fit' in r.output, r.output\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules\n"
        "print(time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 1.0


@pytest.mark.parametrize("command", ["fit", "sweep", "print-config"])
def test_every_command_has_help(command):
    r = cli(command, "--help")
    assert r.returncode == 0 and "--config" in r.stdout and "--set" in r.stdout


def test_print_config_shows_resolved_values():
    r = cli("print-config", "--config", str(CONFIGS / "example.yaml"), "--set", "image.size=99")
    assert r.returncode == 0
    assert "size: 99" in r.stdout and "astronaut.jpg" in r.stdout


def test_fit_end_to_end_then_resume(tmp_path):
    out = tmp_path / "run"
    r = cli("fit", "--config", str(CONFIGS / "example.yaml"), "-q", *sets(tiny_overrides(out, steps=4)))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out / 'final.png'}" in r.stdout
    for name in ["final.png", "config.yaml", "losses.csv", "checkpoints/last.ckpt", "snapshots/step_000003.png"]:
        assert (out / name).is_file(), name

    r = cli("fit", "--config", str(CONFIGS / "example.yaml"), "-q", *sets(tiny_overrides(out, steps=4)))
    assert r.returncode == 2 and "holds a previous run" in r.stderr

    r = cli("fit", "--config", str(CONFIGS / "example.yaml"), "-q", "--resume", "last", *sets(tiny_overrides(out, steps=6)))
    assert r.returncode == 0, r.stderr
    assert len((out / "losses.csv").read_text().splitlines()) == 7


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "loss.style_weight=-1"], "loss.style_weight"),
        (["--set", "bogus=1"], "bogus: unknown key"),
        (["--set", "trainer.precision=16-mixed"], "16-mixed cannot be used with optim.name=lbfgs"),
        (["--set", "content=/nonexistent/photo.jpg"], "image /nonexistent/photo.jpg does not exist"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
        (["--set", "loss.style_layers=[relu6_1]"], "unknown VGG19 layer"),
        (["--resume", "/nonexistent.ckpt"], "no checkpoint at /nonexistent.ckpt"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, args, fragment):
    r = cli("fit", "-q", "--output", str(tmp_path / "r"), *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "a sweep needs at least one --grid"),
        (["--grid", "loss.style_weight"], "not of the form key=v1,v2"),
        (["--grid", "loss.bogus=1,2"], "bogus: unknown key"),
        (["--grid", "seed=1,2", "--cell-px", "8"], "--cell-px 8 is out of range"),
    ],
)
def test_bad_sweeps_give_one_line_and_exit_code_2(tmp_path, args, fragment):
    r = cli("sweep", "-q", "--output", str(tmp_path / "s"), *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr


def test_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    r = cli("sweep", "-q", *sets(tiny_overrides(out, steps=2, **{"image.size": 32})), "--grid", "loss.style_weight=1,100")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out / 'contact_sheet.png'} (2 cells)" in r.stdout
    assert (out / "cells" / "01" / "final.png").is_file() and (out / "sweep.csv").is_file()


def test_corrupt_style_image_is_reported(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    r = cli("fit", "-q", "--output", str(tmp_path / "r"), "--set", f"style={bad}")
    assert r.returncode == 2 and "not an image" in r.stderr or "corrupt" in r.stderr


def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("nst-lightning ")
