"""Runs that stop early keep their work: atomic checkpoints, and no half-written files after a kill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nst_lightning.faults import AtomicCheckpointIO


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


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
    from nst_lightning.api import RunOutputs, prepare_output

    outputs = RunOutputs(tmp_path / "run")
    outputs.checkpoints.mkdir(parents=True)
    stale = [outputs.root / ".final.png.k1l2d3.tmp", outputs.checkpoints / ".last.ckpt.a_b9.tmp"]
    kept = [outputs.root / "final.png", outputs.checkpoints / "last.ckpt", outputs.root / ".notes.txt.x1.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    prepare_output(outputs, resuming=True, overwrite=False)
    assert [p.exists() for p in stale] == [False, False] and all(p.read_bytes() == b"x" for p in kept)
