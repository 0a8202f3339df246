"""The command line end to end: fast help, real runs, resume, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nst_lightning.config import EXAMPLE_CONTENT

from .conftest import CONFIGS, ROOT, tiny_overrides

EXE = [sys.executable, "-m", "nst_lightning"]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_help_answers_without_importing_torch_or_lightning():
    # what makes --help fast is that it never imports torch (seconds); how fast is the benchmark's business
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from nst_lightning.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0 and 'fit' in r.output, r.output\n"
        "print(sorted(m for m in ('torch', 'lightning', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["fit", "sweep", "print-config", "estimate", "export", "validate-onnx"])
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
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: output {out} holds a previous run; add --resume last to continue it, --overwrite to replace it, "
        "or choose another --output directory"
    ]  # the API names resume="last", overwrite=True, output=; the CLI says its flags

    r = cli("fit", "--config", str(CONFIGS / "example.yaml"), "--resume", "last", *sets(tiny_overrides(out, steps=6)))
    assert r.returncode == 0, r.stderr
    assert len((out / "losses.csv").read_text().splitlines()) == 8  # header, steps 0..6
    # progress: not a terminal here, so plain lines on stderr (no \r redraws), none on stdout
    assert "\r" not in r.stderr and "step" not in r.stdout
    assert re.fullmatch(r"Stylising: step 6/6 \(100%\), \d+\.\d\d s/step, loss=\d\.\d\de[+-]\d\d", r.stderr.splitlines()[-1]), r.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "loss.style_weight=-1"], "loss.style_weight"),
        (["--set", "bogus=1"], "bogus: unknown key"),
        (["--set", "trainer.precision=16-mixed"], "16-mixed is not supported"),
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
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: image {bad} is truncated or corrupt ("), r.stderr
    assert lines[0].endswith("re-export or replace the file"), r.stderr
    assert not (tmp_path / "r").exists()


def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("nst-lightning ")


def invoke(*args: str):
    """Run the command in this process (fast: lightning is imported once) and return its result."""
    from typer.testing import CliRunner

    from nst_lightning.cli import app

    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def _thin_image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "thin.png"
    Image.new("RGB", (300, 12), (200, 100, 50)).save(path)
    return path


def _bomb(tmp_path: Path) -> Path:
    from .test_images import _png

    path = tmp_path / "bomb.png"
    path.write_bytes(_png(20_000, 20_000, 8, 0, b"\x00" * 64))
    return path


@pytest.mark.parametrize(
    ("make_args", "fragment"),
    [
        (lambda t: ["--set", "trainer.accelerator=tpu"], "Lightning rejects trainer settings (accelerator=tpu"),
        (lambda t: ["--set", "trainer.strategy=bogus"], "invalid strategy name"),
        (lambda t: ["--set", f"content={t}"], "holds no images"),
        (lambda t: ["--set", f"style={(t / 'notes.txt').write_text('hi') and t / 'notes.txt'}"], "not an image Pillow can read"),
        (lambda t: ["--set", f"content={(t / 'empty.jpg').write_bytes(b'') or t / 'empty.jpg'}"], "empty file"),
        (lambda t: ["--set", f"content={_bomb(t)}"], "more than 179 megapixels"),
        (lambda t: ["--set", f"content={_thin_image(t)}", "--set", "image.size=300"], "need at least 16 px per side"),
        (lambda t: ["--set", f"style={_thin_image(t)}"], "style image is 48x2 px"),
        (lambda t: ["--set", "loss.style_weight=.inf"], "loss.style_weight: Input should be a finite number"),
        (lambda t: ["--set", "image.size=16384"], "image.size=16384 needs about"),
        (lambda t: ["--set", "features.weights=/nonexistent/vgg.pth"], "weights file /nonexistent/vgg.pth does not exist"),
        (lambda t: ["--set", f"output={(t / 'file').write_text('') or t / 'file' / 'run'}"], "a part of the path is a file, not a folder"),
    ],
    ids=["accelerator", "strategy", "directory", "text-file", "empty-file", "bomb", "thin-content", "thin-style",
         "inf-weight", "too-large", "weights-file", "output-under-a-file"],
)
def test_bad_input_through_the_command_is_one_line_and_writes_nothing(tmp_path, make_args, fragment):
    out = tmp_path / "run"
    r = invoke("fit", "-q", *sets(tiny_overrides(out)), *make_args(tmp_path))
    assert_one_line_error(r, fragment)
    assert not out.exists()


def test_inputs_are_never_overwritten_or_deleted(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    photo, snapshot = run / "final.png", run / "snapshots" / "step_000050.png"
    for path in (photo, snapshot):
        Image.new("RGB", (64, 64), (10, 20, 30)).save(path)
    before = {p: p.read_bytes() for p in (photo, snapshot)}

    assert_one_line_error(invoke("fit", "-q", *sets(tiny_overrides(run)), "--set", f"content={photo}"), "would be overwritten")
    assert_one_line_error(
        invoke("fit", "-q", "--overwrite", *sets(tiny_overrides(run)), "--set", f"init={snapshot}"), "would be overwritten"
    )
    assert_one_line_error(invoke("fit", "-q", *sets(tiny_overrides(photo))), f"output {photo} is a file")
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in run.rglob("*")) == ["final.png", "snapshots", "step_000050.png"]


def test_checkpoints_of_other_runs_are_refused_and_the_run_is_untouched(tmp_path):
    import torch

    out = tmp_path / "run"
    assert invoke("fit", "-q", *sets(tiny_overrides(out, steps=2))).exit_code == 0
    ckpt = out / "checkpoints" / "last.ckpt"
    junk, foreign = tmp_path / "junk.ckpt", tmp_path / "foreign.ckpt"
    junk.write_bytes(b"\x80\x02not a checkpoint")
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    cases = [
        (["--set", "image.size=64"], str(ckpt), "belongs to another run (image_shape [1, 3, 48, 48] vs [1, 3, 64, 64]"),
        (["--set", "loss.style_layers=[relu1_1, relu2_1]"], "last", "belongs to another run (layers"),
        (["--set", f"style={EXAMPLE_CONTENT}"], "last", "belongs to another run (other style images)"),
        ([], str(junk), "cannot read checkpoint"),
        ([], str(foreign), "not written by nst-lightning"),
    ]
    for extra, resume, fragment in cases:
        r = invoke("fit", "-q", *sets(tiny_overrides(out, steps=4)), *extra, "--resume", resume)
        assert_one_line_error(r, fragment)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_a_numerical_fault_through_the_command_is_one_line(tmp_path):
    out = tmp_path / "run"
    r = invoke("fit", "-q", *sets(tiny_overrides(out, steps=3)), "--set", "loss.style_weight=1e39")
    assert_one_line_error(r, "the loss or the image became NaN or infinite by step 2; lower optim.lr")
    assert "style_weight 1e+39" in r.stderr and "no checkpoint was written yet" in r.stderr
    from nst_lightning.images import load_image, read_image

    assert not (out / "final.png").exists()
    kept = read_image(out / "interrupted.png")
    assert (kept - load_image(EXAMPLE_CONTENT, 48)).abs().max() <= 1 / 255 + 1e-6  # the starting image, unharmed


def test_estimate_reports_the_need_and_the_largest_size_that_fits():
    r = invoke(
        "estimate", "--config", str(CONFIGS / "example.yaml"),
        "--set", "image.size=200", "--set", "trainer.accelerator=cpu", "--set", "trainer.precision=32-true",
    )
    assert r.exit_code == 0, r.output
    shape, need, free = r.stdout.strip().splitlines()
    assert shape.startswith("image 200x200, styles 200x125; 32-true, lbfgs (history 20)")
    assert re.match(r"needs about \d+\.\d GiB \(activations", need)
    assert re.fullmatch(r"cpu has \d+\.\d GiB free; largest image.size that fits: \d+", free)
    assert_one_line_error(invoke("estimate", "--set", "content=/nonexistent.jpg"), "does not exist")
