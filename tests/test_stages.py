"""Coarse-to-fine scales: each stage starts from the previous result upsampled (with ``scale_init=detail`` plus the
content's finer detail), and resume works mid-stage."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nst_lightning.api import fit
from nst_lightning.config import load_config
from nst_lightning.errors import CheckpointError
from nst_lightning.images import load_image, read_image, resize
from nst_lightning.runs import with_content_detail

from .conftest import EXAMPLE_CONTENT, tiny_overrides

SCALES = {"scales": "[32,48]", "scale_steps": "[3,3]", "snapshot.every_n_steps": 0}


class StopAt(Callback):
    """Stop gracefully at ``step`` of the stage whose image has long side ``size``, as a stop signal would."""

    def __init__(self, size: int, step: int) -> None:
        self.size, self.step = size, step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if max(pl_module.image.shape[-2:]) == self.size and trainer.global_step == self.step:
            trainer.should_stop = True


class StageStarts(Callback):
    """Record the image each stage starts from and the result it ends with."""

    def __init__(self) -> None:
        self.starts: list[torch.Tensor] = []
        self.ends: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self.starts.append(pl_module.result())

    def on_train_end(self, trainer, pl_module):
        self.ends.append(pl_module.result())


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """A two-stage run from start to end, with the image each stage started from and ended with."""
    seen = StageStarts()
    out = fit(load_config(None, tiny_overrides(tmp_path_factory.mktemp("whole"), **SCALES)), progress=False, callbacks=[seen])
    return out, seen


def test_each_stage_starts_from_the_previous_result_upsampled(unbroken):
    out, seen = unbroken
    assert [tuple(s.shape[-2:]) for s in seen.starts] == [(32, 32), (48, 48)]
    torch.testing.assert_close(seen.starts[1], resize(seen.ends[0], (48, 48)), atol=1e-5, rtol=0)
    content = resize(seen.starts[0], (48, 48))
    assert (seen.starts[1] - content).abs().mean() > 0.02  # carried on, not restarted from the content
    assert read_image(out.final).shape[-2:] == (48, 48)
    steps = [int(r.split(",")[0]) for r in out.losses.read_text().splitlines()[1:]]
    assert steps == list(range(0, 7))
    assert all((out.checkpoints / f"stage{k}" / "last.ckpt").is_file() for k in (1, 2))


def test_a_detail_start_is_the_upsampled_result_plus_what_the_coarse_content_lacked(unbroken, tmp_path):
    _, seen = unbroken
    coarse, content = load_image(EXAMPLE_CONTENT, 32), load_image(EXAMPLE_CONTENT, 48)
    start = with_content_detail(seen.ends[0], content, coarse)
    upsampled = resize(seen.ends[0], (48, 48))
    torch.testing.assert_close(start, (upsampled + content - resize(coarse, (48, 48))).clamp(0, 1))
    assert (start - upsampled).abs().mean() > 0.01  # the content's edges are back
    torch.testing.assert_close(with_content_detail(seen.ends[0], coarse, coarse), resize(seen.ends[0], (32, 32)))

    detailed = StageStarts()
    fit(load_config(None, tiny_overrides(tmp_path / "detail", **SCALES, scale_init="detail")), progress=False,
        callbacks=[detailed])
    torch.testing.assert_close(detailed.starts[0], seen.starts[0])
    torch.testing.assert_close(detailed.starts[1], with_content_detail(detailed.ends[0], content, coarse), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("stop_size", "stop_step"), [(32, 3), (48, 2)], ids=["stopped-at-the-end-of-stage-1", "stopped-in-stage-2"]
)
def test_a_stopped_multiscale_run_resumes_in_its_stage_and_ends_where_an_unbroken_run_does(
    unbroken, tiny_config, tmp_path, stop_size, stop_step
):
    split_cfg = tiny_config(output=tmp_path / "split", **SCALES)
    fit(split_cfg, progress=False, callbacks=[StopAt(stop_size, stop_step)])
    stage = 1 if stop_size == 32 else 2
    assert not (tmp_path / "split" / "checkpoints" / f"stage{stage + 1}").exists()
    stopped = torch.load(tmp_path / "split" / "checkpoints" / f"stage{stage}" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == stop_step

    resumed = fit(split_cfg, resume="last", progress=False)
    assert (read_image(unbroken[0].final) - read_image(resumed.final)).abs().max() <= 2 / 255
    steps = [int(r.split(",")[0]) for r in resumed.losses.read_text().splitlines()[1:]]
    assert steps == list(range(0, 7))


def test_a_checkpoint_of_another_scale_list_is_refused(tiny_config, tmp_path):
    fit(tiny_config(output=tmp_path / "a", steps=2, **{"image.size": 40}), progress=False)
    cfg = tiny_config(output=tmp_path / "b", **SCALES)
    with pytest.raises(CheckpointError, match="none of this run's scales"):
        fit(cfg, resume=str(tmp_path / "a" / "checkpoints" / "last.ckpt"), progress=False)
