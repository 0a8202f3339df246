"""The smoothing preconditioner of L-BFGS: symmetric positive definite, on by default for the batched L-BFGS, refused where it cannot apply."""

from collections.abc import Callable

import pytest
import torch

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
    assert OptimConfig().preconditioner_levels == 5
    assert OptimConfig(precondition_levels=0).preconditioner_levels == 0
    assert OptimConfig(name="adam").preconditioner_levels == 0
    assert OptimConfig(line_search="strong_wolfe").preconditioner_levels == 0
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

