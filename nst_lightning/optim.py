"""Optimisers for a batch of independent images stacked in one parameter ``(B, ...)``, without host syncs.

Plain PyTorch. Every quantity that decides a step (dot products, step sizes, the curvature-pair skip)
is a per-image tensor, so image ``b`` follows the iterates it would follow alone, and nothing reads a
value back to Python: the update has static shapes and no data-dependent branch. Given a ``StepGraph``
(``nst_lightning.cudagraph``) a whole step is captured in a CUDA graph and replayed; L-BFGS then keeps
its history in the static layout, whose kernels do not depend on a Python counter either. Both follow
``torch.optim``'s API: ``step(closure)`` evaluates the closure (loss and gradient) and updates,
``max_iter`` times; ``update`` is the only code that changes the images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .cudagraph import StepGraph, graph_key

if TYPE_CHECKING:
    from .sections import OptimConfig

CURVATURE_EPS = 1e-10
"""A curvature pair with ``y.s`` at or below this is skipped, as ``torch.optim.LBFGS`` does."""


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image dot products of two ``(B, N)`` tensors: ``(B,)``, one batched matmul, no temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class SmoothingPreconditioner:
    """``P = I + sum_k gain^k G_k``: the identity plus Gaussian blurs of ``2^(k-1)`` pixels, ``k = 1..levels``.

    L-BFGS's starting inverse Hessian ``gamma * I`` becomes ``gamma * P``, which is L-BFGS on ``z = P^(-1/2) x``:
    the image's low frequencies, which the style and content losses move only slowly per pixel, take larger steps
    (up to ``1 + gain + ... + gain^levels`` times), so the coarse layout settles in fewer evaluations. Each blur is
    separable with zero padding, so ``P`` is symmetric positive definite (a Gaussian's spectrum is positive) and
    costs a few image-sized passes, nothing next to the network. Kernels are built once on ``device`` (no host
    copy inside a captured step).
    """

    def __init__(self, levels: int, gain: float, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.blurs: list[tuple[float, torch.Tensor]] = []
        for k in range(1, levels + 1):
            sigma = 2.0 ** (k - 1)
            radius = math.ceil(3 * sigma)
            x = torch.arange(-radius, radius + 1, dtype=torch.float64)
            kernel = torch.exp(-0.5 * (x / sigma) ** 2)
            self.blurs.append((gain**k, (kernel / kernel.sum()).to(device=device, dtype=dtype)))

    def __call__(self, flat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``P v`` for per-image flat vectors ``(B, N)`` of images shaped ``shape`` ``(B, C, H, W)``: a new tensor."""
        b, c, h, w = shape
        planes = flat.reshape(b * c, 1, h, w)
        out = flat.clone()
        for weight, kernel in self.blurs:
            r = (kernel.numel() - 1) // 2
            kernel = kernel.to(planes.dtype)
            rows = F.conv2d(planes, kernel.view(1, 1, 1, -1), padding=(0, r))
            out.add_(F.conv2d(rows, kernel.view(1, 1, -1, 1), padding=(r, 0)).reshape(b, -1), alpha=weight)
            del rows  # at most three image-sized temporaries at once (memory.PRECONDITIONER_COPIES)
        return out


class _BatchedOptimizer(torch.optim.Optimizer):
    """One parameter, its first dimension a batch of independent problems."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        defaults: dict[str, Any],
        max_iter: int = 1,
        after_update: Callable[[], None] | None = None,
        graph: StepGraph | None = None,
    ) -> None:
        super().__init__(params, defaults)
        if len(self.param_groups) != 1 or len(self.param_groups[0]["params"]) != 1:
            raise ValueError(f"{type(self).__name__} optimises exactly one parameter (the stacked images)")
        self.max_iter = max_iter
        self.after_update = after_update
        self.graph = graph
        """With a ``StepGraph``, each step with a closure is captured once per parameter and shape, then replayed."""
        self._lr: torch.Tensor | None = None

    @property
    def param(self) -> torch.Tensor:
        return self.param_groups[0]["params"][0]

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """``max_iter`` times: evaluate ``closure`` (it sets the gradient), update every image from its gradient,
        then call ``after_update`` (e.g. a projection onto the valid range). Without a closure, one update.

        With ``graph``, a replay repeats the closure captured at the first step after the warm-up: every step's
        closure must launch the same work (Lightning's closure around the module's ``evaluate`` does).
        """
        self._set_lr()
        if self.graph is not None and closure is not None:
            return self.graph(lambda: self._steps(closure), graph_key(self.param), self.param.device)
        return self._steps(closure)

    def _set_lr(self) -> None:
        """Copy the group's ``lr`` into the device tensor the update reads, before the step (outside any graph),
        so a learning rate changed between steps (a scheduler, a resume) is honoured by replays too."""
        if self._lr is None or self._lr.device != self.param.device:
            self._lr = torch.zeros((), dtype=torch.float32, device=self.param.device)
        self._lr.fill_(self.param_groups[0]["lr"])

    def _learning_rate(self) -> torch.Tensor:
        """The learning rate as the update reads it: the device tensor ``step`` filled (filled here on a bare ``update``)."""
        if self._lr is None:
            self._set_lr()
        return self._lr

    def _steps(self, closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
        """The step proper; the update runs with autocast off, so its state and dot products stay fp32 even when
        the caller (Lightning's ``bf16-mixed`` around ``training_step``) runs the closure under autocast."""
        loss = None
        for _ in range(self.max_iter if closure is not None else 1):
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            with torch.no_grad(), torch.autocast(self.param.device.type, enabled=False):
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
    along the two-loop direction. An image whose ``y.s`` is too small gets an empty pair (weight 0) instead
    of a curvature pair, so it keeps one pair fewer until that pair ages out (torch keeps the older pair
    instead; with no skip the two are the same).

    Two layouts of the ``history_size`` pairs, with the same arithmetic (empty pairs contribute exact zeros):
    ``ring`` (default) writes the newest pair over the oldest, the slot chosen by a Python counter: no copies,
    the cheaper on CPU. ``static`` (``static_history=True``, and always with a ``graph``) keeps the newest
    pair in the last slot and shifts the older ones down, runs the two-loop over every slot and keeps the
    update count in a tensor, so the kernels of one update are the same at every step and a captured graph can be
    replayed. A saved state of either layout loads into either.

    With a ``preconditioner`` ``P`` (``SmoothingPreconditioner``) the two-loop starts from ``gamma * P`` instead of
    ``gamma * I``, with ``gamma = y.s / y.Py``, and the first step has L1 length ``min(1, |Pg|_1) * lr`` along
    ``-Pg``: L-BFGS in the variable ``P^(-1/2) x``, the history and its arithmetic otherwise unchanged.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1.0,
        history_size: int = 20,
        static_history: bool = False,
        skip_first_pair: bool = False,
        preconditioner: SmoothingPreconditioner | None = None,
        **kwargs: Any,
    ) -> None:
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        super().__init__(params, {"lr": lr, "history_size": history_size}, **kwargs)
        self.static_history = static_history or self.graph is not None
        self.preconditioner = preconditioner
        self.skip_first_pair = skip_first_pair
        """Drop the pair of the first update: torch's first step moves the images by ``lr`` in L1 norm in all,
        below what a bf16 network input resolves, so its gradient change measures only the fp32 terms (the
        smoothness terms, the temporal term) and a curvature taken from it throws the next step far out."""

    def _state(self, flat: torch.Tensor) -> dict[str, Any]:
        state = self.state[self.param]
        if "dirs" not in state:
            b, n = flat.shape
            m = self.param_groups[0]["history_size"]
            state["updates"] = flat.new_zeros(()) if self.static_history else 0
            state["dirs"] = flat.new_zeros((m, b, n))
            state["steps"] = flat.new_zeros((m, b, n))
            state["rho"] = flat.new_zeros((m, b))
            state["h_diag"] = flat.new_ones(b)
            state["d"] = flat.new_zeros((b, n))
            state["t"] = flat.new_zeros(b)
            state["prev_grad"] = flat.new_zeros((b, n))
        elif isinstance(state["updates"], torch.Tensor) != self.static_history:
            _change_layout(state, self.static_history)
        return state

    def update(self) -> None:
        p = self.param
        b = p.shape[0]
        grad = p.grad.reshape(b, -1)
        state = self._state(grad)
        lr = self._learning_rate()
        if self.static_history:
            order, first = self._record_pair_static(grad, state)
        else:
            order, first = self._record_pair_ring(grad, state)
        q = grad.neg()
        alphas = {}
        for i in order:
            alphas[i] = _dot(state["steps"][i], q) * state["rho"][i]
            q.addcmul_(state["dirs"][i], alphas[i].unsqueeze(1), value=-1.0)
        d = (q if self.preconditioner is None else self.preconditioner(q, p.shape)).mul_(state["h_diag"].unsqueeze(1))
        for i in reversed(order):
            beta = _dot(state["dirs"][i], d) * state["rho"][i]
            d.addcmul_(state["steps"][i], (alphas[i] - beta).unsqueeze(1))
        if isinstance(first, bool):
            t = torch.clamp(1.0 / d.abs().sum(1), max=1.0) * lr if first else lr.expand(b)
        else:
            t = torch.where(first, torch.clamp(1.0 / d.abs().sum(1), max=1.0) * lr, lr)
        t = torch.where(_dot(grad, d) > 0, 0.0, t)  # not a descent direction: stand still, as torch does
        state["prev_grad"].copy_(grad)
        state["d"].copy_(d)
        state["t"].copy_(t)
        p.view(b, -1).addcmul_(d, t.unsqueeze(1))

    def _pair(self, grad: torch.Tensor, state: dict[str, Any], valid: bool | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The curvature pair of the last update, its weight ``rho`` (0: skipped) and whether it is taken."""
        y = grad - state["prev_grad"]
        s = state["d"] * state["t"].unsqueeze(1)
        ys = _dot(y, s)
        take = (ys > CURVATURE_EPS) & valid
        rho = torch.where(take, 1.0 / torch.where(take, ys, 1.0), 0.0)
        py = y if self.preconditioner is None else self.preconditioner(y, self.param.shape)
        state["h_diag"].copy_(torch.where(take, ys / _dot(y, py).clamp_min(torch.finfo(y.dtype).tiny), state["h_diag"]))
        return y, s, rho

    def _record_pair_ring(self, grad: torch.Tensor, state: dict[str, Any]) -> tuple[list[int], bool]:
        """Ring layout: the pair over the oldest slot; the slots newest first (fixed by the count, not by data)."""
        m = state["dirs"].shape[0]
        k = state["updates"]
        if k > 0:
            slot = (k - 1) % m
            y, s, rho = self._pair(grad, state, not (self.skip_first_pair and k == 1))
            state["dirs"][slot].copy_(y)
            state["steps"][slot].copy_(s)
            state["rho"][slot] = rho
        state["updates"] = k + 1
        return [(k - 1 - j) % m for j in range(min(k, m))], k == 0

    def _record_pair_static(self, grad: torch.Tensor, state: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
        """Static layout: older pairs shift down one slot, the pair (empty on the first update) goes last."""
        m = state["dirs"].shape[0]
        first = state["updates"] == 0
        valid = ~first & (state["updates"] != 1) if self.skip_first_pair else ~first
        y, s, rho = self._pair(grad, state, valid)
        for i in range(m - 1):  # slot by slot: no temporary the size of the history
            state["dirs"][i].copy_(state["dirs"][i + 1])
            state["steps"][i].copy_(state["steps"][i + 1])
        state["rho"].copy_(state["rho"].roll(-1, 0))
        state["dirs"][m - 1].copy_(y)
        state["steps"][m - 1].copy_(s)
        state["rho"][m - 1].copy_(rho)
        state["updates"].add_(1)
        return list(range(m - 1, -1, -1)), first


def _change_layout(state: dict[str, Any], static: bool) -> None:
    """Rearrange a saved L-BFGS history between the ring and static layouts (e.g. a CPU checkpoint resumed on CUDA).

    With ``k`` updates done, both hold the ``min(k - 1, m)`` newest pairs: the ring's newest in slot
    ``(k - 2) % m``, the static layout's in slot ``m - 1``. Reads the count once (a host sync, at load only).
    """
    m = state["dirs"].shape[0]
    k = int(state["updates"])
    pairs = [((k - 2 - i) % m, m - 1 - i) for i in range(min(max(k - 1, 0), m))]  # (ring slot, static slot)
    moved = {key: torch.zeros_like(state[key]) for key in ("dirs", "steps", "rho")}
    for ring, fixed in pairs:
        source, target = (ring, fixed) if static else (fixed, ring)
        for key in moved:
            moved[key][target] = state[key][source]
    state.update(moved)
    state["updates"] = state["rho"].new_tensor(float(k)) if static else k


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
        p.addcdiv_(state["exp_avg"], denom * (correction1 / self._learning_rate()), value=-1.0)


def build_optimizer(
    cfg: OptimConfig, image: torch.Tensor, clamp: Callable[[], None], graph: StepGraph | None, skip_first_pair: bool
) -> torch.optim.Optimizer:
    """Batched L-BFGS or Adam over ``image`` (``max_iter`` updates per step, ``clamp`` after each, the step
    captured in ``graph`` if given; ``skip_first_pair`` for a bf16 network, see ``BatchedLBFGS``; preconditioned by
    ``SmoothingPreconditioner`` with ``optim.precondition_levels``); torch's L-BFGS
    for ``line_search: strong_wolfe`` (one image, clamped after the step by the caller, always eager)."""
    if cfg.line_search == "strong_wolfe":
        return torch.optim.LBFGS(
            [image],
            lr=cfg.learning_rate,
            max_iter=cfg.max_iter,
            history_size=cfg.history_size,
            line_search_fn=cfg.line_search,
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )
    common = {"lr": cfg.learning_rate, "max_iter": cfg.max_iter, "after_update": clamp, "graph": graph}
    if cfg.name == "adam":
        return BatchedAdam([image], **common)
    levels = cfg.resolved_precondition_levels
    preconditioner = SmoothingPreconditioner(levels, cfg.precondition_gain, image.device) if levels else None
    return BatchedLBFGS(
        [image], history_size=cfg.history_size, skip_first_pair=skip_first_pair, preconditioner=preconditioner, **common
    )
