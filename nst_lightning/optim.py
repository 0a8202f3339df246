"""Optimisers for a batch of independent images stacked in one parameter ``(B, ...)``, without host syncs.

Plain PyTorch. Every quantity that decides a step (dot products, step sizes, the curvature-pair skip)
is a per-image tensor, so image ``b`` follows the iterates it would follow alone, and nothing reads a
value back to Python: the update has static shapes and no data-dependent branch, ready for a CUDA graph.
Both follow ``torch.optim``'s API: ``step(closure)`` evaluates the closure (loss and gradient) and
updates, ``max_iter`` times; ``update`` is the only code that changes the images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

CURVATURE_EPS = 1e-10
"""A curvature pair with ``y.s`` at or below this is skipped, as ``torch.optim.LBFGS`` does."""


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image dot products of two ``(B, N)`` tensors: ``(B,)``, one batched matmul, no temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _BatchedOptimizer(torch.optim.Optimizer):
    """One parameter, its first dimension a batch of independent problems."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        defaults: dict[str, Any],
        max_iter: int = 1,
        after_update: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(params, defaults)
        if len(self.param_groups) != 1 or len(self.param_groups[0]["params"]) != 1:
            raise ValueError(f"{type(self).__name__} optimises exactly one parameter (the stacked images)")
        self.max_iter = max_iter
        self.after_update = after_update

    @property
    def param(self) -> torch.Tensor:
        return self.param_groups[0]["params"][0]

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """``max_iter`` times: evaluate ``closure`` (it sets the gradient), update every image from its gradient,
        then call ``after_update`` (e.g. a projection onto the valid range). Without a closure, one update."""
        loss = None
        for _ in range(self.max_iter if closure is not None else 1):
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            with torch.no_grad():
                self.update()
                if self.after_update is not None:
                    self.after_update()
        return loss

    def update(self) -> None:
        raise NotImplementedError


class BatchedLBFGS(_BatchedOptimizer):
    """L-BFGS with a fixed step (no line search), one independent history per image.

    For one image it follows ``torch.optim.LBFGS(max_iter=1, line_search_fn=None, tolerance_grad=0,
    tolerance_change=0)``: the first step is scaled by ``min(1, 1/|g|_1)``, later ones have length ``lr``
    along the two-loop direction. Curvature pairs live in a ring of ``history_size`` slots; the ring
    advances on every update after the first, and an image whose ``y.s`` is too small gets an empty slot
    there (weight 0) instead of a pair, so it keeps one pair fewer until that slot is reused (torch keeps
    the older pair instead; with no skip the two are the same).
    """

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float = 1.0, history_size: int = 20, **kwargs: Any
    ) -> None:
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        super().__init__(params, {"lr": lr, "history_size": history_size}, **kwargs)

    def _state(self, flat: torch.Tensor) -> dict[str, Any]:
        state = self.state[self.param]
        if "dirs" not in state:
            b, n = flat.shape
            m = self.param_groups[0]["history_size"]
            state["updates"] = 0
            state["dirs"] = flat.new_zeros((m, b, n))
            state["steps"] = flat.new_zeros((m, b, n))
            state["rho"] = flat.new_zeros((m, b))
            state["h_diag"] = flat.new_ones(b)
            state["d"] = flat.new_zeros((b, n))
            state["t"] = flat.new_zeros(b)
            state["prev_grad"] = flat.new_zeros((b, n))
        return state

    def update(self) -> None:
        p = self.param
        b = p.shape[0]
        grad = p.grad.reshape(b, -1)
        state = self._state(grad)
        lr = self.param_groups[0]["lr"]
        m = state["dirs"].shape[0]
        k = state["updates"]
        if k > 0:
            slot = (k - 1) % m
            y = grad - state["prev_grad"]
            s = state["d"] * state["t"].unsqueeze(1)
            ys = _dot(y, s)
            take = ys > CURVATURE_EPS
            state["dirs"][slot].copy_(y)
            state["steps"][slot].copy_(s)
            state["rho"][slot] = torch.where(take, 1.0 / torch.where(take, ys, 1.0), 0.0)
            state["h_diag"].copy_(torch.where(take, ys / _dot(y, y).clamp_min(torch.finfo(y.dtype).tiny), state["h_diag"]))
        filled = min(k, m)
        order = [(k - 1 - j) % m for j in range(filled)]  # newest first; fixed by the update count, not by data
        q = grad.neg()
        alphas = {}
        for i in order:
            alphas[i] = _dot(state["steps"][i], q) * state["rho"][i]
            q.addcmul_(state["dirs"][i], alphas[i].unsqueeze(1), value=-1.0)
        d = q.mul_(state["h_diag"].unsqueeze(1))
        for i in reversed(order):
            beta = _dot(state["dirs"][i], d) * state["rho"][i]
            d.addcmul_(state["steps"][i], (alphas[i] - beta).unsqueeze(1))
        if k == 0:
            t = torch.clamp(1.0 / grad.abs().sum(1), max=1.0) * lr
        else:
            t = torch.full_like(state["t"], lr)
        t = torch.where(_dot(grad, d) > 0, 0.0, t)  # not a descent direction: stand still, as torch does
        state["prev_grad"].copy_(grad)
        state["d"].copy_(d)
        state["t"].copy_(t)
        state["updates"] = k + 1
        p.view(b, -1).addcmul_(d, t.unsqueeze(1))


class BatchedAdam(_BatchedOptimizer):
    """Adam (Kingma & Ba) whose step count and bias corrections stay tensors, so no step reads the device.

    Elementwise, hence per image already; it matches ``torch.optim.Adam`` with the same betas and eps.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps}, **kwargs)

    def update(self) -> None:
        p = self.param
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), device=p.device)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        grad = p.grad
        state["step"].add_(1)
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction1 = 1 - torch.pow(beta1, state["step"])
        correction2 = 1 - torch.pow(beta2, state["step"])
        denom = (state["exp_avg_sq"] / correction2).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom * (correction1 / group["lr"]), value=-1.0)
