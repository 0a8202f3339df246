"""Batch runs: batched images follow the optimisation they follow alone, every pair is written once, reruns skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import lightning as L
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nst_lightning.api import fit
from nst_lightning.batch import BatchStylizer, fit_batch
from nst_lightning.cli import app
from nst_lightning.config import EXAMPLE_CONTENT, load_config
from nst_lightning.errors import ConfigError
from nst_lightning.images import load_image, read_image
from nst_lightning.module import StyleTransferModule

from .conftest import ROOT


def make_frames(folder, count: int, side: int = 40) -> list[str]:
    """``count`` different crops of the bundled photo, ``side`` pixels square, as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.open(EXAMPLE_CONTENT).convert("RGB")
    for i in range(count):
        photo.crop((60 * i, 0, 60 * i + 300, 300)).resize((side, side)).save(folder / f"frame{i}.png")
    return [f"frame{i}__starry_night.png" for i in range(count)]


def test_a_shared_evaluation_gives_each_image_the_gradient_it_gets_alone(style_small, extractor):
    # One batched VGG pass must not mix images: each image's gradient equals its solo gradient up to float
    # rounding (convolution kernels are chosen per batch size, so not bit for bit).
    photo = load_image(EXAMPLE_CONTENT, 32)
    stylizer = BatchStylizer(steps=1, extractor=extractor)
    together = [stylizer.problem(c, [style_small]) for c in (photo, photo.flip(-1))]
    alone = [stylizer.problem(c, [style_small]) for c in (photo, photo.flip(-1))]
    shared = stylizer._evaluate(together)
    solo = [stylizer._evaluate([p])[0] for p in alone]
    for a, b, loss_a, loss_b in zip(together, alone, shared, solo):
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=0)
        scale = b.image.grad.abs().max()
        assert scale > 0
        torch.testing.assert_close(a.image.grad, b.image.grad, rtol=0, atol=1e-4 * float(scale))


@pytest.mark.parametrize("optim", [{"name": "adam"}, {"name": "lbfgs", "history_size": 5}])
def test_batched_images_follow_the_same_optimisation_as_one_by_one(style_small, extractor, optim):
    photo = load_image(EXAMPLE_CONTENT, 32)
    contents = [photo, photo.flip(-1)]
    stylizer = BatchStylizer(steps=3, optim=optim, extractor=extractor)
    together = [stylizer.problem(c, [style_small]) for c in contents]
    stylizer.optimize(together)
    alone = [stylizer.problem(c, [style_small]) for c in contents]
    for problem in alone:
        stylizer.optimize([problem])
    for a, b, c in zip(together, alone, contents):
        moved = (b.result() - c).abs().max()
        assert moved > 0.01, "the optimisation moved the image"
        # float rounding differs between batch sizes and L-BFGS amplifies it, but far below what the steps move
        assert (a.result() - b.result()).abs().max() < 0.05 * moved


def test_one_image_follows_the_same_optimisation_as_a_single_run(content_small, style_small, extractor):
    module = StyleTransferModule(content_small, style_small, extractor=extractor)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    stylizer = BatchStylizer(steps=3, extractor=extractor)
    problem = stylizer.problem(content_small, [style_small])
    stylizer.optimize([problem])
    torch.testing.assert_close(problem.image, module.image, atol=1e-3, rtol=0)


def test_lbfgs_with_several_evaluations_per_step_never_shares_a_step(content_small, style_small, extractor):
    stylizer = BatchStylizer(steps=1, optim={"max_iter": 3}, extractor=extractor)
    problems = [stylizer.problem(content_small, [style_small]) for _ in range(2)]
    with pytest.raises(ValueError, match="share a step only with adam or lbfgs with max_iter 1"):
        stylizer.optimize(problems)


def test_cli_batch_writes_each_pair_reports_failures_with_exit_1_and_reruns_skip(tmp_path):
    names = make_frames(tmp_path / "frames", 3)
    (tmp_path / "frames" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    out = tmp_path / "out"
    args = ["fit", "--set", f"content={tmp_path / 'frames'}", "--output", str(out), "--set", "image.size=32",
            "--set", "trainer.max_steps=2", "--set", "trainer.accelerator=cpu", "--set", "batch.images_per_device=2",
            "--set", "trainer.precision=32-true"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1, first.output
    assert "4 images: 3 written, 0 already complete (skipped), 1 failed" in first.output
    assert f"failed broken__starry_night.png: image {tmp_path / 'frames' / 'broken.jpg'} is truncated" in first.output
    assert "images: 100%" in first.output and "4/4" in first.output
    assert sorted(p.name for p in out.glob("*.png")) == names
    assert all(read_image(out / n).shape == (1, 3, 32, 32) for n in names)
    stamps = {n: (out / n).stat().st_mtime_ns for n in names}

    again = CliRunner().invoke(app, [*args, "-q"])
    assert again.exit_code == 1
    assert "4 images: 0 written, 3 already complete (skipped), 1 failed" in again.output
    assert {n: (out / n).stat().st_mtime_ns for n in names} == stamps

    (tmp_path / "frames" / "broken.jpg").unlink()
    resumed = CliRunner().invoke(app, [*args, "-q", "--resume", "last"])
    assert resumed.exit_code == 2 and "rerun a batch as it was" in resumed.output


def test_overwrite_redoes_finished_pairs(tmp_path):
    make_frames(tmp_path / "frames", 2)
    cfg = load_config(None, [f"content={tmp_path / 'frames'}", f"output={tmp_path / 'out'}", "image.size=32",
                             "trainer.max_steps=1", "trainer.accelerator=cpu", "trainer.precision=32-true"])
    assert len(fit_batch(cfg, progress=False).done) == 2
    report = fit_batch(cfg, overwrite=True, progress=False)
    assert len(report.done) == 2 and report.skipped == []


def test_16_mixed_is_refused_for_batch_runs_and_single_fit_refuses_batch_configs(tmp_path):
    make_frames(tmp_path / "frames", 1)
    cfg = load_config(None, [f"content={tmp_path / 'frames'}", f"output={tmp_path / 'out'}", "optim.name=adam",
                             "trainer.precision=16-mixed"])
    with pytest.raises(ConfigError, match="16-mixed is not supported for batch runs; use bf16-mixed or 32-true"):
        fit_batch(cfg)
    with pytest.raises(ConfigError, match="run it with nst_lightning.fit_batch"):
        fit(cfg)
    assert not (tmp_path / "out").exists()


def test_two_ddp_processes_share_a_folder_each_pair_written_once_and_a_rerun_skips_all(tmp_path):
    names = make_frames(tmp_path / "frames", 4)
    out = tmp_path / "out"
    settings = [f"content={tmp_path / 'frames'}", "image.size=32", "trainer.max_steps=3", "trainer.accelerator=cpu",
                "trainer.precision=32-true"]
    cmd = [sys.executable, "-m", "nst_lightning", "fit", "-q", "--output", str(out),
           *[a for s in [*settings, "trainer.devices=2", "trainer.strategy=ddp"] for a in ("--set", s)]]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 images: 4 written, 0 already complete (skipped), 0 failed" in run.stdout
    assert "rank 0: 2 written" in run.stdout and "rank 1: 2 written" in run.stdout

    summary = json.loads((out / "batch-summary.json").read_text())
    written = [r["name"] for r in summary["results"] if r["status"] == "done"]
    assert sorted(written) == names, "every pair written exactly once"
    by_rank = [{r["name"] for r in summary["results"] if r["rank"] == rank} for rank in (0, 1)]
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    assert sorted(p.name for p in out.glob("*.png")) == names

    single = load_config(None, [*settings, f"output={tmp_path / 'single'}"])
    fit_batch(single, progress=False)
    for name in names:
        # each rank runs with its own thread count (Lightning sets OMP_NUM_THREADS), so kernels differ in the
        # last bits; the same pair must still come out as the same picture
        diff = (read_image(out / name) - read_image(tmp_path / "single" / name)).abs()
        assert diff.mean() < 0.5 / 255 and diff.max() <= 8 / 255, (name, float(diff.mean()), float(diff.max()))

    stamps = {n: (out / n).stat().st_mtime_ns for n in names}
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "4 images: 0 written, 4 already complete (skipped), 0 failed" in rerun.stdout
    assert {n: (out / n).stat().st_mtime_ns for n in names} == stamps
    shutil.rmtree(tmp_path / "single")
