"""One CUDA graph per optimiser step: ``max_iter`` x (evaluation, update, projection) captured once, then replayed.

Plain PyTorch. ``StepGraph`` follows torch's "whole network capture" recipe: a few eager steps on a side
stream (cuDNN and cuBLAS choose their algorithms, lazily created state such as the optimiser's history is
allocated, first-call branches are passed), then one step captured, then every step is a replay, which
launches the whole step's kernels at once instead of one by one from Python. At 512 px that launch
overhead, not the arithmetic, bounds a GPU (engineering notes: 2.6x with the graph on an H100).

What a replay repeats is exactly what the captured call launched on the GPU, so the step must obey:
- Static memory: every tensor the step reads or changes lives across replays at the same address (the
  parameter, the targets, module buffers, the optimiser's state, made during the warm-up). Tensors the step
  allocates come from the graph's private pool and get the same addresses at every replay; its returned
  tensor is such a static output, overwritten by each replay. Hence the gradient is reset with
  ``.grad = None`` inside the step (backward then allocates it from the pool), never between replays.
- No host syncs (``.item()``, ``bool(t)``), no copies from the CPU (so no tensor made from Python data inside
  the step: constants are buffers made before it), no Python decision on a value: Python state read inside
  (counters, first-call flags) is frozen at capture. The learning rate is read from a device tensor filled
  before each step, so a changed ``lr`` is honoured; other hyperparameters (betas, history size) are fixed. The L-BFGS history therefore uses
  its static layout (``BatchedLBFGS(static_history=True)``), whose update count is a tensor.
- Shapes fixed: a new parameter (a stage, a folder group) or a new shape is a new key, which starts the
  warm-up and capture again; the old graph and its pool are freed.
- Autocast (Lightning's ``bf16-mixed``) runs with its weight-cast cache off during capture, as torch asks.

On other devices the same calls run the step eagerly every time, so the bookkeeping above is exercised by
CPU tests. Code that runs inside the step only in Python (e.g. a callback's ``on_before_optimizer_step``)
runs during the warm-up and the capture, not at replays.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")

WARMUP_STEPS = 3
"""Eager steps before capture; torch's examples use 3 (11 with DDP, not needed here: no collectives in a step)."""


def graph_key(param: torch.Tensor) -> tuple[Hashable, ...]:
    """What a captured step is bound to: the parameter object, its storage address, shape, dtype and device."""
    return (id(param), param.data_ptr(), tuple(param.shape), param.dtype, str(param.device))


class StepGraph:
    """Runs a step eagerly ``warmup`` times, then captures it once in a CUDA graph and replays it, per key.

    Warm-up steps run on one side stream per device, made once: the caching allocator keeps a pool per stream,
    so a new stream per step would allocate the step's working set again each time. A capture that runs out of
    memory is given up for that key with a warning, and its steps run eagerly (nothing of a failed capture ran).
    """

    def __init__(self, warmup: int = WARMUP_STEPS) -> None:
        self.warmup = warmup
        self.key: tuple[Hashable, ...] | None = None
        self.eager_steps = 0
        self.captures = 0
        """How many graphs were captured (one per key)."""
        self.replays = 0
        self.failed_captures = 0
        """Captures given up for lack of memory; their keys run eagerly."""
        self._graph: torch.cuda.CUDAGraph | None = None
        self._output: object = None
        self._eager_only = False
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, step: Callable[[], T], key: tuple[Hashable, ...], device: torch.device) -> T:
        """One step: eager while warming up (or off CUDA), captured at the first call after, replayed from then on."""
        if key != self.key:
            self.key, self.eager_steps, self._graph, self._output, self._eager_only = key, 0, None, None, False
        if self._graph is None and self.eager_steps < self.warmup:
            self.eager_steps += 1
            return self._eager(step, device)
        if device.type != "cuda" or self._eager_only:
            return step()
        if self._graph is None:
            try:
                self._graph, self._output = _capture(step)
            except RuntimeError as err:
                if not _out_of_memory(err):
                    raise
                self._give_up_capture(err)
                return step()
            self.captures += 1
        self._graph.replay()
        self.replays += 1
        return self._output  # type: ignore[return-value]

    def _give_up_capture(self, err: BaseException) -> None:
        """After an out-of-memory capture: free what it held and run this key's steps eagerly from now on."""
        self._graph, self._output, self._eager_only = None, None, True
        self.failed_captures += 1
        torch.cuda.empty_cache()
        warnings.warn(
            f"out of memory capturing the step's CUDA graph ({str(err).splitlines()[0]}); running the steps eagerly "
            "(optim.cuda_graph=false skips the capture)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _eager(self, step: Callable[[], T], device: torch.device) -> T:
        """A warm-up step; on CUDA on the side stream, so the capture later sees a stream no eager work is queued on."""
        if device.type != "cuda":
            return step()
        side = self._streams.get(device)
        if side is None:
            side = self._streams[device] = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = step()
        torch.cuda.current_stream(device).wait_stream(side)
        return out


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` (or the error it was raised while handling: a capture's teardown may raise its own) is an OOM."""
    while err is not None:
        if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err):
            return True
        err = err.__context__
    return False


def _capture(step: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """Capture one call of ``step`` (nothing runs yet: the caller replays it) and its static output.

    ``thread_local`` capture mode: other threads (NCCL's watchdog, a data loader's pin thread) may go on calling
    CUDA APIs that the default ``global`` mode would make fail the capture.
    """
    graph = torch.cuda.CUDAGraph()
    autocast = torch.is_autocast_enabled("cuda")
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=autocast, cache_enabled=False):
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = step()
    return graph, out
