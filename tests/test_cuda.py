"""What only a CUDA device can show; skipped where there is none (CI), run on a GPU machine as it is."""

from __future__ import annotations

import pytest
import torch

from nst_lightning.color import matched_colors
from nst_lightning.gram import gram_matrix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_colour_matching_runs_on_the_images_device():
    style, content = torch.rand(1, 3, 16, 20), torch.rand(1, 3, 16, 16)
    on_gpu = matched_colors(style.cuda(), content.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), matched_colors(style, content), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_bf16_gram_on_cuda_is_the_fp32_gram_of_its_values(layout):
    f = torch.randn(2, 64, 96, 128, device="cuda").to(torch.bfloat16).contiguous(memory_format=layout)
    gram = gram_matrix(f)
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram, gram_matrix(f.double()).float(), rtol=1e-4, atol=1e-5)


def _fit(content, style, extractor, steps: int, precision: str = "32-true", **optim):
    import lightning as L

    from nst_lightning.module import StyleTransferModule

    module = StyleTransferModule(content, style, extractor=extractor, optim=optim)
    trainer = L.Trainer(max_steps=steps, accelerator="gpu", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    return module, trainer


@pytest.mark.parametrize(("precision", "optim"), [("32-true", {"max_iter": 3}), ("bf16-mixed", {"max_iter": 2}),
                                                  ("32-true", {"name": "adam"}),
                                                  ("bf16-mixed", {"precondition_levels": 5})])
def test_the_captured_step_computes_what_the_eager_step_computes(content_small, style_small, extractor, precision, optim):
    steps = 12
    eager, _ = _fit(content_small, style_small, extractor, steps, precision, cuda_graph=False, **optim)
    graphed, trainer = _fit(content_small, style_small, extractor, steps, precision, cuda_graph=True, **optim)
    graph = trainer.strategy.optimizers[0].graph
    assert graph.captures == 1 and graph.replays == steps - graph.warmup
    assert (eager.result() - content_small).abs().max() > 0.02  # it moved
    # the same arithmetic, but cuDNN's benchmark may pick other kernels per run and L-BFGS amplifies their
    # last-bit differences: compare the images as a whole, as tests/test_engine.py does
    difference = (graphed.result() - eager.result()).abs()
    assert difference.mean() < 1e-3 and difference.max() < 0.05
    assert graphed.step_terms.device.type == "cuda" and torch.isfinite(graphed.step_terms).all()


def test_auto_captures_on_cuda_and_cudnn_benchmark_is_restored(content_small, style_small, extractor):
    before = torch.backends.cudnn.benchmark
    _, trainer = _fit(content_small, style_small, extractor, 5)
    assert trainer.strategy.optimizers[0].graph.captures == 1
    assert torch.backends.cudnn.benchmark == before


def test_a_step_graph_replays_and_recaptures_for_a_new_parameter():
    from nst_lightning.cudagraph import StepGraph, graph_key

    graph = StepGraph(warmup=2)
    a, b = torch.ones(4, device="cuda"), torch.ones(8, device="cuda")
    for x in [a] * 5 + [b] * 4:
        graph(lambda: x.mul_(2), graph_key(x), x.device)
    torch.cuda.synchronize()
    assert a.eq(32).all() and b.eq(16).all()  # every call did its work, replays included
    assert graph.captures == 2 and graph.replays == 3 + 2


def test_the_launcher_does_not_initialise_cuda_before_the_trainer_fits(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    script = f"""
import lightning as L, torch
from nst_lightning.api import fit
from nst_lightning.config import load_config
seen = []
def fit_reached(self, *a, **k):
    seen.append(torch.cuda.is_initialized())
    raise SystemExit(0 if seen == [False] else 3)
L.Trainer.fit = fit_reached
fit(load_config(None, ["output={tmp_path / 'run'}", "image.size=64", "trainer.max_steps=1"]), progress=False)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
