"""Runs that stop early keep their work: atomic checkpoints, signals, kills, NaNs, no memory or disk left.

In-process tests send signals to this process from a callback (the handler runs at once, so they are
deterministic); the subprocess tests drive the real command and poll for files, never sleep blindly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nst_lightning.api import fit
from nst_lightning.errors import NumericalError, ResourceError, RunInterrupted
from nst_lightning.faults import AtomicCheckpointIO
from nst_lightning.images import read_image, to_pil
from nst_lightning.losses import StyleTransferLoss

from .conftest import ROOT, tiny_overrides


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _checkpoint_image(path: Path) -> torch.Tensor:
    """The image a checkpoint holds, as the 8-bit file it would be saved as."""
    pixels = np.asarray(to_pil(_ckpt(path)["state_dict"]["image"] / 255.0), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)


def _steps(losses: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in losses.read_text().splitlines()[1:]]


class SignalAt(Callback):
    """Send ``signals`` to this process at the start of step ``step`` (1-based), as a user or a scheduler would."""

    def __init__(self, step: int, *signals: int) -> None:
        self.step, self.signals = step, signals

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            for s in self.signals:
                os.kill(os.getpid(), s)


# --- atomic checkpoints ---------------------------------------------------------------------------


def test_checkpoint_writes_are_atomic_and_stay_in_the_checkpoint_folder(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    temp_root = tmp_path / "tmpdir"
    temp_root.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp_root))

    real_save = torch.save

    def dies_half_way(obj, fh, *a, **kw):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert _ckpt(path) == {"step": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert not list(temp_root.iterdir())


def test_half_written_files_of_a_killed_run_are_cleared_on_the_next_start(tmp_path):
    from nst_lightning.rundir import RunOutputs, prepare_output

    outputs = RunOutputs(tmp_path / "run")
    outputs.checkpoints.mkdir(parents=True)
    stale = [outputs.root / ".final.png.k1l2d3.tmp", outputs.checkpoints / ".last.ckpt.a_b9.tmp"]
    kept = [outputs.root / "final.png", outputs.checkpoints / "last.ckpt", outputs.root / ".notes.txt.x1.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    prepare_output(outputs, resuming=True, overwrite=False)
    assert [p.exists() for p in stale] == [False, False] and all(p.read_bytes() == b"x" for p in kept)


# --- signals, in process --------------------------------------------------------------------------


def test_sigterm_stops_at_the_step_end_and_resume_matches_an_uninterrupted_run(tiny_config, tmp_path):
    whole = fit(tiny_config(steps=6, output=tmp_path / "whole"), progress=False)
    cfg = tiny_config(steps=6, output=tmp_path / "split", **{"checkpoint.every_n_steps": 100})
    with pytest.raises(RunInterrupted) as err:
        fit(cfg, progress=False, callbacks=[SignalAt(3, signal.SIGTERM)])
    assert err.value.signum == signal.SIGTERM and err.value.resumable
    assert "interrupted by SIGTERM at step 3" in str(err.value) and 'resume="last"' in str(err.value)
    run = tmp_path / "split"
    assert not (run / "final.png").exists()
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    torch.testing.assert_close(read_image(run / "interrupted.png"), _checkpoint_image(run / "checkpoints" / "last.ckpt"))
    assert _steps(run / "losses.csv") == [0, 1, 2]  # row s: the image after s steps; row 3 comes with the resume
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    resumed = fit(cfg, resume="last", progress=False)
    assert _steps(resumed.losses) == [0, 1, 2, 3, 4, 5, 6]
    assert (read_image(resumed.final) - read_image(whole.final)).abs().max() <= 2 / 255


def test_a_second_signal_stops_at_once_keeping_the_last_checkpoint(tiny_config):
    cfg = tiny_config(steps=8, **{"checkpoint.every_n_steps": 2})
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # SIG_IGN when started with `&`
    with pytest.raises(RunInterrupted) as err:
        fit(cfg, progress=False, callbacks=[SignalAt(4, signal.SIGTERM, signal.SIGINT)])
    message = str(err.value)
    assert "stopped at once by a second signal during step 4" in message
    assert "holds step 2" in message and err.value.resumable
    run = Path(cfg.output)
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert (run / "interrupted.png").is_file()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back as they were


# --- numerical faults and memory, in process ------------------------------------------------------


def _fail_from_call(monkeypatch, call: int, make_error) -> None:
    """Make the loss misbehave from its ``call``-th evaluation on (one evaluation per step here)."""
    real = StyleTransferLoss.forward
    calls = {"n": 0}

    def forward(self, features, image):
        calls["n"] += 1
        terms = real(self, features, image)
        if calls["n"] >= call:
            return make_error(terms)
        return terms

    monkeypatch.setattr(StyleTransferLoss, "forward", forward)


def _nan_terms(terms):
    return {k: v * float("nan") for k, v in terms.items()}


def test_a_nan_loss_stops_with_advice_and_keeps_the_last_good_image_and_checkpoint(tiny_config, monkeypatch):
    cfg = tiny_config(steps=8, **{"checkpoint.every_n_steps": 2, "snapshot.every_n_steps": 1})
    _fail_from_call(monkeypatch, 6, _nan_terms)  # evaluation 6 is step 6 (the targets pass is not a forward call)
    with pytest.raises(NumericalError) as err:
        fit(cfg, progress=False)
    message = str(err.value)
    assert "NaN or infinite by step 6" in message and "lower optim.lr (now 1)" in message
    assert 'holds step 4: continue with resume="last"' in message
    run = Path(cfg.output)
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert torch.isfinite(_ckpt(run / "checkpoints" / "last.ckpt")["state_dict"]["image"]).all()
    torch.testing.assert_close(read_image(run / "interrupted.png"), read_image(run / "snapshots" / "step_000005.png"))
    assert not (run / "final.png").exists()

    monkeypatch.undo()
    lrs = []

    class RecordLR(Callback):
        def on_train_batch_end(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    fixed = tiny_config(steps=8, **{"checkpoint.every_n_steps": 2, "optim.lr": 0.5})
    out = fit(fixed, resume="last", progress=False, callbacks=[RecordLR()])
    assert lrs == [0.5] * 4 and read_image(out.final).isfinite().all()
    assert _steps(out.losses) == list(range(0, 9))


def test_running_out_of_memory_mid_run_is_reported_with_advice(tiny_config, monkeypatch):
    from nst_lightning import resources

    def oom(terms):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    cfg = tiny_config(steps=6, **{"checkpoint.every_n_steps": 2, "trainer.precision": "32-true"})
    _fail_from_call(monkeypatch, 4, oom)
    monkeypatch.setattr(resources, "available_cpu_memory", lambda: 10**12)
    with pytest.raises(ResourceError) as err:
        fit(cfg, progress=False)
    message = str(err.value)
    assert message.startswith("ran out of memory on cpu at image.size=48")
    assert "lower image.size" in message and "use trainer.precision=bf16-mixed" in message
    assert "holds step 2" in message and (Path(cfg.output) / "interrupted.png").is_file()


def _out_of_memory_below(monkeypatch, blocks: int) -> list[int]:
    """Make the network run out of memory on the image's forward pass with fewer than ``blocks`` recomputed
    VGG blocks, as a GPU whose memory the CPU-calibrated estimate overrated does; returns the blocks tried."""
    from nst_lightning.features import VGGFeatures

    forward, tried = VGGFeatures.forward, []

    def measured(self, image, checkpoint_blocks=0):
        if image.requires_grad:
            tried.append(checkpoint_blocks)
            if checkpoint_blocks < blocks:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, image, checkpoint_blocks)

    monkeypatch.setattr(VGGFeatures, "forward", measured)
    return tried


def test_out_of_memory_in_the_first_step_recomputes_more_blocks_and_the_run_goes_on(tiny_config, monkeypatch, caplog):
    tried = _out_of_memory_below(monkeypatch, 2)
    out = fit(tiny_config(steps=3), progress=False)
    assert tried[:3] == [0, 1, 2] and set(tried[3:]) == {2}  # two retries, then every evaluation with two blocks
    assert read_image(out.final).isfinite().all() and _steps(out.losses) == [0, 1, 2, 3]
    said = [r.getMessage() for r in caplog.records if "recomputing" in r.getMessage()]
    assert len(said) == 2 and said[-1].startswith("out of memory in the first step on cpu: recomputing 2 VGG block(s)")


def test_out_of_memory_with_checkpoint_blocks_set_is_reported_not_retried(tiny_config, monkeypatch):
    tried = _out_of_memory_below(monkeypatch, 2)
    with pytest.raises(ResourceError, match="ran out of memory on cpu"):
        fit(tiny_config(steps=3, **{"features.checkpoint_blocks": 1}), progress=False)
    assert tried == [1]


def test_a_full_disk_mid_run_is_reported_and_keeps_the_last_checkpoint(tiny_config, monkeypatch):
    import errno

    from nst_lightning import images

    real = images.replace_atomically

    def full_from_step_3(path, write, **kw):
        if "step_000003" in str(path) or "interrupted" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name
        return real(path, write, **kw)

    monkeypatch.setattr(images, "replace_atomically", full_from_step_3)
    cfg = tiny_config(steps=6, **{"checkpoint.every_n_steps": 2, "snapshot.every_n_steps": 1})
    with pytest.raises(ResourceError) as err:
        fit(cfg, progress=False)
    message = str(err.value)
    assert message.startswith(f"cannot write the run's files in {cfg.output} (No space left on device)")
    assert "no image was saved" in message and 'holds step 2: continue with resume="last"' in message
    assert _ckpt(Path(cfg.output) / "checkpoints" / "last.ckpt")["global_step"] == 2


# --- the real command, killed and interrupted -----------------------------------------------------


def _start(output: Path, steps: int, *flags: str, **extra: object) -> subprocess.Popen[str]:
    """``nst-lightning fit`` on the tiny settings, in its own process (the environment passed through)."""
    items = tiny_overrides(output, steps, **extra)
    args = [a for item in items for a in ("--set", item)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "nst_lightning", "fit", "-q", *flags, *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def test_ctrl_c_to_the_command_saves_checkpoint_and_image_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, 10_000, **{"checkpoint.every_n_steps": 10_000, "snapshot.every_n_steps": 1})
    _wait_for(lambda: (out / "snapshots" / "step_000002.png").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted by SIGINT at step (\d+); saved .*; resume with: "
                         r"nst-lightning fit .* --resume last", last)
    assert match and f"--set output={out} " in last, stderr
    step = int(match.group(1))
    assert "Traceback" not in stderr
    ckpt = out / "checkpoints" / "last.ckpt"
    assert _ckpt(ckpt)["global_step"] == step >= 2
    torch.testing.assert_close(read_image(out / "interrupted.png"), _checkpoint_image(ckpt))
    assert _steps(out / "losses.csv") == list(range(0, step))  # row s: the image after s steps; a resume adds the rest


def test_a_killed_run_resumes_to_a_valid_final_image(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, 10_000, **{"checkpoint.every_n_steps": 1, "snapshot.every_n_steps": 0})
    ckpt = out / "checkpoints" / "last.ckpt"

    def checkpointed_twice() -> bool:
        return ckpt.exists() and _ckpt(ckpt)["global_step"] >= 2

    _wait_for(checkpointed_twice, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    step = _ckpt(ckpt)["global_step"]

    resumed = _start(out, step + 3, "--resume", "last", **{"checkpoint.every_n_steps": 1, "snapshot.every_n_steps": 0})
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    final = read_image(out / "final.png")
    assert final.shape[-2:] == (48, 48) and final.std() > 0.05
    assert _ckpt(ckpt)["global_step"] == step + 3
    assert _steps(out / "losses.csv") == list(range(0, step + 4))
