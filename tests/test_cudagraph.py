"""The CUDA-graph code path: its static L-BFGS history and its step bookkeeping, run eagerly on the CPU.

On CUDA the same path captures and replays (tests/test_cuda.py); here every step runs eagerly, so these
tests check that the graph path computes what the plain path computes.
"""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch

from nst_lightning import cudagraph
from nst_lightning.cudagraph import StepGraph, graph_key
from nst_lightning.module import StyleTransferModule
from nst_lightning.optim import BatchedAdam, BatchedLBFGS


def _problem(seed: int = 0):
    """Three smooth non-quadratic problems and a linear one (zero curvature: L-BFGS skips every pair of it)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 30, 30, generator=gen)
    a = a @ a.transpose(1, 2) + 0.1 * torch.eye(30)
    b = torch.randn(4, 30, generator=gen)

    def f(x: torch.Tensor) -> torch.Tensor:
        curved = 0.5 * torch.einsum("bi,bij,bj->b", x[:3], a, x[:3]) - (b[:3] * x[:3]).sum(1) + 0.1 * x[:3].pow(4).sum(1)
        return curved.sum() - 0.01 * (b[3] * x[3]).sum()

    return f


def _run(optimizer_factory, steps: int, x: torch.Tensor | None = None, state: dict | None = None):
    f = _problem()
    x = torch.zeros(4, 30) if x is None else x
    x = x.clone().requires_grad_(True)
    opt = optimizer_factory([x])
    if state is not None:
        opt.load_state_dict(state)

    def closure():
        x.grad = None
        loss = f(x)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return x.detach(), opt


@pytest.mark.parametrize("history", [1, 5])
def test_the_static_history_follows_the_ring_beyond_its_size(history):
    ring, ring_opt = _run(lambda p: BatchedLBFGS(p, history_size=history), 4 * history + 7)
    static, static_opt = _run(lambda p: BatchedLBFGS(p, history_size=history, static_history=True), 4 * history + 7)
    assert ring[:3].abs().max() > 0.3 and ring[3].abs().max() > 0.01  # every problem moved
    assert static_opt.state[static_opt.param]["rho"][:, 3].abs().max() == 0  # the linear problem's pairs were skipped
    torch.testing.assert_close(static, ring, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("static_first", [False, True])
def test_a_saved_history_continues_in_the_other_layout(static_first):
    # e.g. a checkpoint of a CPU run resumed with the CUDA graph, or the reverse
    def make(static: bool):
        return lambda p: BatchedLBFGS(p, history_size=4, static_history=static)

    straight, _ = _run(make(static_first), 16)
    half, opt = _run(make(static_first), 10)  # the ring's newest pair is in slot 0, the static one's in slot 3
    continued, other = _run(make(not static_first), 6, x=half, state=opt.state_dict())
    assert isinstance(other.state[other.param]["updates"], torch.Tensor) == (not static_first)
    torch.testing.assert_close(continued, straight, atol=1e-5, rtol=1e-5)


def test_a_step_graph_warms_up_per_parameter_and_shape_and_runs_eagerly_off_cuda():
    graph = StepGraph(warmup=2)
    calls = []
    cpu = torch.device("cpu")
    a, b = torch.zeros(2, 3), torch.zeros(3, 3)
    for param in [a, a, a, a, b, b, b]:
        graph(lambda: calls.append(param.shape[0]), graph_key(param), cpu)
    assert calls == [2, 2, 2, 2, 3, 3, 3]  # every call ran its step
    assert graph.key == graph_key(b) and graph.eager_steps == 2
    assert graph.captures == 0 and graph.replays == 0  # nothing is captured without CUDA


def test_the_module_gives_the_same_image_with_and_without_the_graph_path(content_small, style_small, extractor):
    def run(graph):
        module = StyleTransferModule(content_small, style_small, extractor=extractor,
                                     optim={"history_size": 3, "max_iter": 2, "cuda_graph": graph})
        L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(module)
        return module

    plain, graphed = run(False), run(True)
    optimizer = graphed.trainer.strategy.optimizers[0]
    assert plain.trainer.strategy.optimizers[0].graph is None
    assert optimizer.graph is not None and optimizer.static_history and optimizer.graph.eager_steps == 3
    assert (plain.result() - content_small).abs().max() > 0.02  # it moved
    torch.testing.assert_close(graphed.result(), plain.result(), atol=1e-4, rtol=0)


def test_auto_leaves_a_cpu_run_eager(content_small, style_small, extractor):
    module = StyleTransferModule(content_small, style_small, extractor=extractor)
    assert module.optim_config.cuda_graph == "auto"
    assert module.step_graph() is None
    assert StyleTransferModule(content_small, style_small, extractor=extractor, optim={"cuda_graph": True}).step_graph()


class _FakeStream:
    made = 0

    def __init__(self, device=None) -> None:
        _FakeStream.made += 1

    def wait_stream(self, other) -> None:
        pass


def _pretend_cuda(monkeypatch) -> None:
    """Stand-ins for the CUDA stream calls, so the graph's CUDA branch runs its Python logic on the CPU."""
    current = _FakeStream()
    _FakeStream.made = 0
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


def test_warm_up_steps_share_one_side_stream_and_an_out_of_memory_capture_runs_the_steps_eagerly(monkeypatch):
    _pretend_cuda(monkeypatch)

    def capture_out_of_memory(step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cudagraph, "_capture", capture_out_of_memory)
    graph, calls, cuda = StepGraph(warmup=3), [], torch.device("cuda")
    key = graph_key(torch.zeros(2, 3))
    with pytest.warns(RuntimeWarning, match="out of memory capturing the step's CUDA graph"):
        for _ in range(6):
            graph(lambda: calls.append(1), key, cuda)
    assert _FakeStream.made == 1, "one side stream for every warm-up step"
    assert len(calls) == 6 and graph.failed_captures == 1 and graph.captures == 0 and graph.replays == 0


def test_a_capture_failing_for_another_reason_is_raised(monkeypatch):
    _pretend_cuda(monkeypatch)

    def capture_refused(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cudagraph, "_capture", capture_refused)
    graph = StepGraph(warmup=0)
    with pytest.raises(RuntimeError, match="not permitted"):
        graph(lambda: None, graph_key(torch.zeros(1)), torch.device("cuda"))


def test_a_learning_rate_changed_between_steps_is_used_by_the_next_step():
    # a captured step reads lr from a device tensor filled before each step, not a Python float frozen at capture
    def run(make, new_lr: float):
        x = torch.linspace(-1, 1, 12).view(2, 6).requires_grad_(True)
        opt = make([x])
        for step in range(6):
            if step == 3:
                opt.param_groups[0]["lr"] = new_lr

            def closure():
                opt.zero_grad()
                loss = (x - 0.3).pow(4).sum() + x.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
        return x.detach()

    batched = run(lambda p: BatchedAdam(p, lr=0.05, graph=StepGraph(warmup=1)), 0.5)
    torch.testing.assert_close(batched, run(lambda p: torch.optim.Adam(p, lr=0.05), 0.5), atol=1e-4, rtol=1e-4)
    assert (batched - run(lambda p: torch.optim.Adam(p, lr=0.05), 0.05)).abs().max() > 0.1  # the change mattered
