"""The smoothing preconditioner of L-BFGS: symmetric positive definite, off by default, refused where it cannot apply."""

import pytest
import torch

from nst_lightning.optim import SmoothingPreconditioner
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


def test_precondition_is_off_by_default_and_refused_with_adam_or_a_line_search():
    assert OptimConfig().precondition_levels == 0
    for bad in ({"name": "adam"}, {"line_search": "strong_wolfe"}):
        with pytest.raises(ValueError, match="precondition_levels"):
            OptimConfig(precondition_levels=3, **bad)
