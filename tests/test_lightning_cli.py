"""LightningCLI builds the module from the shipped YAML (images as paths, settings as typed sections), runs
``fit``, continues with ``--ckpt_path last``, and its callbacks write the image in any Trainer."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from nst_lightning import lightning_cli
from nst_lightning.callbacks import FinalImage, ImageSnapshots
from nst_lightning.config import EXAMPLE_CONTENT, EXAMPLE_STYLE, EXAMPLES_DIR
from nst_lightning.images import read_image
from nst_lightning.module import StyleTransferModule

from .conftest import CONFIGS, ROOT

pytest.importorskip("jsonargparse", reason="LightningCLI needs the cli extra (jsonargparse[signatures])")

TINY = ["--model.size", "32", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
        "--trainer.log_every_n_steps", "1"]


def lightning_cli_run(cwd, *args: str) -> subprocess.CompletedProcess:
    """``python -m nst_lightning.lightning_cli ARGS`` from ``cwd``, as a user runs it from a clone."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nst_lightning.lightning_cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def clone(tmp_path):
    """A directory laid out as the repository is (the YAML's relative paths hold there), written into freely."""
    (tmp_path / "nst_lightning").mkdir()
    (tmp_path / "nst_lightning" / "examples").symlink_to(EXAMPLES_DIR)
    return tmp_path


def _global_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def _metric_steps(path) -> list[int]:
    with open(path, newline="") as fh:
        return [int(row["step"]) for row in csv.DictReader(fh)]


def test_fit_from_the_shipped_yaml_then_ckpt_path_last_continues(clone):
    config = str(CONFIGS / "lightning_cli.yaml")
    r = lightning_cli_run(clone, "fit", "--config", config, *TINY, "--trainer.max_steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    run = clone / "runs" / "lightning_cli"
    first = run / "lightning_logs" / "version_0"
    assert _global_step(run / "checkpoints" / "last.ckpt") == 3
    assert max(read_image(first / "final.png").shape[-2:]) == 32
    assert _metric_steps(first / "metrics.csv") == [0, 1, 2]  # Lightning counts logged steps from 0
    assert (first / "images" / "image_step_000003.png").is_file()  # ImageLogger's CSV-logger fallback
    hparams = (first / "hparams.yaml").read_text()
    assert "astronaut.jpg" in hparams and "tensor" not in hparams  # inputs recorded as paths, never as values

    r = lightning_cli_run(clone, "fit", "--config", config, *TINY, "--trainer.max_steps", "5", "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Restored all states" in r.stderr
    second = run / "lightning_logs" / "version_1"
    assert _global_step(run / "checkpoints" / "last.ckpt") == 5
    assert _metric_steps(second / "metrics.csv") == [3, 4]  # steps 4 and 5 only: it went on from step 3
    changed = (read_image(second / "final.png") - read_image(first / "final.png")).abs().max()
    assert changed > 1 / 255


def test_print_config_resolves_the_model_section_without_running(clone, monkeypatch, capsys):
    monkeypatch.chdir(clone)
    with pytest.raises(SystemExit) as exit_:
        lightning_cli.main(["fit", "--config", str(CONFIGS / "lightning_cli.yaml"), "--model.size", "64",
                            "--model.loss.style_weight", "100", "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "content: nst_lightning/examples/astronaut.jpg" in out
    assert "size: 64" in out and "style_weight: 100.0" in out and "style_layers:" in out
    assert not (clone / "runs").exists()


def test_a_missing_image_is_a_one_line_error(clone, monkeypatch, capsys):
    monkeypatch.chdir(clone)
    with pytest.raises(SystemExit) as exit_:
        lightning_cli.main(["fit", "--config", str(CONFIGS / "lightning_cli.yaml"), *TINY, "--model.content", "missing.jpg"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: image missing.jpg does not exist; check the path"


def test_without_jsonargparse_the_error_names_the_extra(monkeypatch, capsys):
    monkeypatch.setattr(lightning_cli, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit_:
        lightning_cli.main(["fit"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: LightningCLI needs jsonargparse[signatures], which is not installed; pip install 'nst-lightning[cli]'"
    )


def test_a_folder_run_through_lightning_cli_with_the_pairs_data_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lightning_cli.main([
        "fit", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--data", "nst_lightning.data.StylePairsDataModule", "--data.content", f"{EXAMPLES_DIR}/*.jpg",
        "--data.style", str(EXAMPLE_STYLE), "--data.output", "out", "--data.size", "32", "--data.steps", "2",
    ])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "astronaut__starry_night.png", "starry_night__starry_night.png", "the_scream__starry_night.png"
    ]


def test_image_callbacks_write_under_the_trainers_log_dir_in_a_plain_trainer(extractor, tmp_path):
    module = StyleTransferModule(EXAMPLE_CONTENT, EXAMPLE_STYLE, size=32, extractor=extractor)
    assert module.hparams["content"] == str(EXAMPLE_CONTENT) and module.hparams["size"] == 32
    logger = CSVLogger(tmp_path / "logs")
    trainer = L.Trainer(max_steps=4, accelerator="cpu", precision="32-true", logger=logger, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[FinalImage(), ImageSnapshots(every_n_steps=2)])
    trainer.fit(module)
    where = tmp_path / "logs" / "lightning_logs" / "version_0"
    assert sorted(p.name for p in (where / "snapshots").iterdir()) == ["step_000002.png", "step_000004.png"]
    final = read_image(where / "final.png")
    assert final.shape == module.result().shape
    assert (final - module.result()).abs().max() <= 1 / 255 + 1e-6  # 8-bit PNG of the result

    module = StyleTransferModule(EXAMPLE_CONTENT, EXAMPLE_STYLE, size=32, extractor=extractor)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", precision="32-true", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path / "root",
                        callbacks=[FinalImage()])
    trainer.fit(module)
    assert (tmp_path / "root" / "final.png").is_file()  # no logger: the Trainer's default_root_dir


def _fit(*args: str) -> None:
    """``fit`` from the shipped YAML at the tiny settings, in this process (the working directory is the clone)."""
    lightning_cli.main(["fit", "--config", str(CONFIGS / "lightning_cli.yaml"), *TINY, *args])


def _refused(capsys, *args: str) -> str:
    """The one line ``fit ARGS`` is refused with (exit code 2, nothing else on stderr but Lightning's info lines)."""
    with pytest.raises(SystemExit) as exit_:
        _fit(*args)
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback", "usage"))]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture
def finished_run(clone, monkeypatch):
    """A 2-step run from the shipped YAML in ``clone``, with its last checkpoint copied out of the run's folders."""
    monkeypatch.chdir(clone)
    _fit("--trainer.max_steps", "2")
    kept = clone / "kept" / "step2.ckpt"
    kept.parent.mkdir()
    kept.write_bytes((clone / "runs" / "lightning_cli" / "checkpoints" / "last.ckpt").read_bytes())
    return kept


def test_ckpt_path_a_checkpoint_file_of_the_run_continues_from_its_step(finished_run, clone):
    _fit("--trainer.max_steps", "3", "--ckpt_path", str(finished_run.relative_to(clone)))
    run = clone / "runs" / "lightning_cli"
    assert _global_step(run / "checkpoints" / "last.ckpt") == 3
    assert _metric_steps(run / "lightning_logs" / "version_1" / "metrics.csv") == [2]  # only step 3 was taken


def test_ckpt_path_a_checkpoint_of_other_settings_is_refused_before_anything_is_written(finished_run, clone, capsys):
    line = _refused(capsys, "--model.size", "48", "--ckpt_path", "kept/step2.ckpt")
    assert line.startswith("error: --ckpt_path kept/step2.ckpt: checkpoint belongs to another run (image_shape")
    assert not (clone / "runs" / "lightning_cli" / "lightning_logs" / "version_1").exists()


def test_ckpt_path_a_file_that_is_no_checkpoint_is_refused_in_one_line(clone, monkeypatch, capsys):
    monkeypatch.chdir(clone)
    (clone / "notes.ckpt").write_text("not a checkpoint\n")
    line = _refused(capsys, "--ckpt_path", "notes.ckpt")
    assert line.startswith("error: --ckpt_path notes.ckpt: cannot read checkpoint notes.ckpt")
    assert _refused(capsys, "--ckpt_path", "missing.ckpt").startswith("error: --ckpt_path missing.ckpt is not a file")
    assert not (clone / "runs").exists()


def test_an_unknown_layer_is_one_line_naming_the_option_with_a_suggestion(clone, monkeypatch, capsys):
    monkeypatch.chdir(clone)
    line = _refused(capsys, "--model.loss", "{style_layers: [relu1_1, relu9_9]}")
    assert line.startswith("error: --model.loss.style_layers: unknown VGG19 layer 'relu9_9'; did you mean 'relu5_4'?")


def test_a_bad_size_is_one_line_naming_the_lightning_cli_option(clone, monkeypatch, capsys):
    monkeypatch.chdir(clone)
    line = _refused(capsys, "--model.size", "-3")
    assert line.startswith("error: --model.size: ") and "image.size" not in line
    line = _refused(capsys, "--model.style_scale", "0")
    assert line.startswith("error: --model.style_scale: ")


def test_package_messages_name_this_clis_options():
    message = "content image is 1x1 px; raise image.size or image.style_scale, or lower loss.tv_weight; give content="
    assert lightning_cli.for_lightning_cli(message) == (
        "content image is 1x1 px; raise --model.size or --model.style_scale, or lower --model.loss.tv_weight; give --model.content"
    )


def test_default_root_dir_moves_everything_the_run_writes(clone, monkeypatch):
    monkeypatch.chdir(clone)
    _fit("--trainer.max_steps", "2", "--trainer.default_root_dir", "elsewhere/run1")
    root = clone / "elsewhere" / "run1"
    logs = root / "lightning_logs" / "version_0"
    assert _global_step(root / "checkpoints" / "last.ckpt") == 2
    assert _metric_steps(logs / "metrics.csv") == [0, 1]
    assert (logs / "final.png").is_file() and (logs / "images" / "image_step_000002.png").is_file()
    assert (logs / "config.yaml").is_file()
    assert sorted(p.name for p in clone.iterdir()) == ["elsewhere", "nst_lightning"]  # nothing in ./runs or ./lightning_logs

    _fit("--trainer.max_steps", "3", "--trainer.default_root_dir", "elsewhere/run1", "--ckpt_path", "last")
    assert _global_step(root / "checkpoints" / "last.ckpt") == 3  # "last" is looked up under the root dir too


def test_no_progress_bar_leaves_the_shipped_one_out_instead_of_failing(clone, monkeypatch, capsys):
    monkeypatch.chdir(clone)
    _fit("--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false")
    assert _global_step(clone / "runs" / "lightning_cli" / "checkpoints" / "last.ckpt") == 2
    assert "it/s" not in capsys.readouterr().err
