"""The smoothing preconditioner of L-BFGS: symmetric positive definite, on by default for the batched L-BFGS,
refused where it cannot apply, and no bigger in memory than the estimate counts."""

import weakref
from collections.abc import Callable, Iterable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nst_lightning.memory import PRECONDITIONER_COPIES
from nst_lightning.optim import BatchedLBFGS, SmoothingPreconditioner
from nst_lightning.sections import OptimConfig


def test_the_preconditioner_is_symmetric_positive_definite_and_boosts_low_frequencies():
    torch.manual_seed(0)
    shape = torch.Size((2, 3, 41, 45))
    p = SmoothingPreconditioner(3, 2.0, torch.device("cpu"), torch.float64)
    u, v = torch.randn(2, shape.numel() // 2, dtype=torch.float64), torch.randn(2, shape.numel() // 2, dtype=torch.float64)
    assert torch.allclose((p(u, shape) * v).sum(1), (u * p(v, shape)).sum(1), rtol=1e-10)
    assert ((p(u, shape) * u).sum(1) >= (u * u).sum(1)).all()
    flat = torch.ones(2, shape.numel() // 2, dtype=torch.float64)
    centre = p(flat, shape).view(shape)[:, :, 20, 22]
    assert torch.allclose(centre, torch.full_like(centre, 1 + 2 + 4 + 8), rtol=1e-3)  # a constant gets 1 + gain + ...


def test_precondition_is_on_by_default_for_the_batched_lbfgs_only_and_refused_with_adam_or_a_line_search():
    assert OptimConfig().resolved_precondition_levels == 5
    assert OptimConfig(precondition_levels=0).resolved_precondition_levels == 0
    assert OptimConfig(name="adam").resolved_precondition_levels == 0
    assert OptimConfig(line_search="strong_wolfe").resolved_precondition_levels == 0
    for bad in ({"name": "adam"}, {"line_search": "strong_wolfe"}):
        with pytest.raises(ValueError, match="precondition_levels"):
            OptimConfig(precondition_levels=3, **bad)


def _smooth_problem() -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A loss whose low frequencies move slowly per pixel, as style and content losses do: squared image gradients
    plus a weak pull to a smooth target, so its Hessian is a Laplacian (small on smooth images) plus ``1e-3 I``."""
    torch.manual_seed(0)
    target = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4), size=(32, 32), mode="bicubic") * 50

    def loss(x: torch.Tensor) -> torch.Tensor:
        d = x - target
        return ((d[..., 1:, :] - d[..., :-1, :]) ** 2).sum() + ((d[..., 1:] - d[..., :-1]) ** 2).sum() + 1e-3 * (d**2).sum()

    return target, loss


def _run(levels: int, steps: int) -> torch.Tensor:
    target, loss = _smooth_problem()
    x = torch.zeros_like(target, requires_grad=True)
    pre = SmoothingPreconditioner(levels, 2.0, x.device) if levels else None
    opt = BatchedLBFGS([x], lr=1.0, history_size=10, preconditioner=pre)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss(x)
        value.backward()
        return value

    for _ in range(steps):
        opt.step(closure)
    return (x.detach() - target).norm() / target.norm()


def test_preconditioned_lbfgs_settles_a_slow_low_frequency_problem_in_fewer_steps():
    plain, preconditioned = _run(0, 30), _run(4, 30)
    assert preconditioned.item() < 0.5 * plain.item(), (plain, preconditioned)



class PeakBytes(TorchDispatchMode):
    """The peak, after any op, of the bytes held by storages that tensors made inside the mode keep alive."""

    def __init__(self, outside: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.outside = {t.untyped_storage().data_ptr() for t in outside}
        self.storages: dict[int, tuple[int, list[weakref.ref]]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (key := t.untyped_storage().data_ptr()) not in self.outside:
                held = self.storages.get(key)
                if held is None or not self._alive(held[1]):  # a new storage, possibly at a freed one's address
                    held = self.storages[key] = (t.untyped_storage().nbytes(), [])
                held[1].append(weakref.ref(t))
        self.peak = max(self.peak, sum(n for n, refs in self.storages.values() if self._alive(refs)))
        return out

    @staticmethod
    def _alive(refs: list[weakref.ref]) -> bool:
        return any(r() is not None for r in refs)


def _lbfgs_step_copies(levels: int) -> float:
    """Peak image-sized copies made during one L-BFGS step (after three, so the history is full) beyond its state."""
    torch.manual_seed(0)
    x, target = torch.rand(2, 3, 48, 56, requires_grad=True), torch.rand(2, 3, 48, 56)
    pre = SmoothingPreconditioner(levels, 2.0, x.device) if levels else None
    opt = BatchedLBFGS([x], lr=1.0, history_size=3, preconditioner=pre)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = ((x - target) ** 2).sum()
        value.backward()
        return value

    for _ in range(3):
        opt.step(closure)
    state = [t for s in opt.state.values() for t in tree_flatten(dict(s))[0] if isinstance(t, torch.Tensor)]
    with PeakBytes([x, target, *state]) as peak:
        opt.step(closure)
    return peak.peak / (x.numel() * 4)


def test_the_preconditioner_holds_no_more_image_copies_than_the_memory_estimate_counts():
    shape = torch.Size((2, 3, 64, 80))
    v = torch.randn(2, shape.numel() // 2)
    with torch.no_grad(), PeakBytes([v]) as peak:
        SmoothingPreconditioner(5, 2.0, v.device)(v, shape)
    assert peak.peak <= (PRECONDITIONER_COPIES + 0.01) * v.numel() * 4
    assert _lbfgs_step_copies(5) - _lbfgs_step_copies(0) <= PRECONDITIONER_COPIES + 0.01
