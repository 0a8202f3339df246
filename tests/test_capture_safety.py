"""What CUDA graph capture refuses, caught on the CPU: the region ``StepGraph`` captures (``max_iter`` x evaluation,
update and projection) audited op by op under a ``TorchDispatchMode``, and the optimiser's arithmetic in fp32.

A capture fails on a tensor made from Python data inside the step (a host-to-device copy from pageable memory),
on a host read (``.item()``, ``bool(t)``), on copies between devices and on random ops; and a replay repeats the
captured kernels, so two steps after the warm-up must launch the same ops on the same shapes, dtypes and strides.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nst_lightning import optim as optim_module
from nst_lightning.cudagraph import WARMUP_STEPS
from nst_lightning.flow import consistency_weights, warp
from nst_lightning.losses import TemporalTarget
from nst_lightning.module import StyleTransferModule

aten = torch.ops.aten
PYTHON_DATA = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
HOST_READS = {aten._local_scalar_dense.default, aten.item.default}
COPIES = {aten._to_copy.default, aten.copy_.default, aten.to.device, aten.to.dtype_layout}


class CaptureAudit(TorchDispatchMode):
    """Records every op with its tensors' shapes, dtypes and strides, and what a CUDA graph capture would refuse."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []
        self.refused: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors if t.dim() > 0}
        if func in PYTHON_DATA:
            self.refused.append(f"{func}: a tensor made from Python data (a host-to-device copy on CUDA)")
        if func in HOST_READS:
            self.refused.append(f"{func}: a host read of a device value")
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.refused.append(f"{func}: a random op")
        if len(devices) > 1 or (func in COPIES and "device" in kwargs and kwargs["device"] is not None
                                and torch.device(kwargs["device"]) not in {t.device for t in tensors[:1]}):
            self.refused.append(f"{func}: a copy across devices {sorted(map(str, devices))}")
        self.ops.append((str(func), tuple((tuple(t.shape), t.dtype, t.stride()) for t in tensors)))
        return out


@contextmanager
def audited_steps(monkeypatch) -> Iterator[list[CaptureAudit]]:
    """Audit the region a ``StepGraph`` captures (``_BatchedOptimizer._steps``) in every step after the warm-up."""
    audits: list[CaptureAudit] = []
    calls = [0]
    original = optim_module._BatchedOptimizer._steps

    def steps(self, closure):
        calls[0] += 1
        if calls[0] <= WARMUP_STEPS:
            return original(self, closure)
        audit = CaptureAudit()
        with audit:
            out = original(self, closure)
        audits.append(audit)
        return out

    monkeypatch.setattr(optim_module._BatchedOptimizer, "_steps", steps)
    yield audits


def _fit(module: StyleTransferModule, precision: str, steps: int = WARMUP_STEPS + 2) -> None:
    # logging only at the last step: the logged losses are read outside the captured region anyway
    L.Trainer(max_steps=steps, accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=100).fit(module)


def _assert_capturable(audits: list[CaptureAudit]) -> None:
    assert len(audits) == 2, "two steps audited after the warm-up"
    refused = sorted({r for a in audits for r in a.refused})
    assert not refused, "a CUDA graph capture would fail on:\n" + "\n".join(refused)
    first, second = (a.ops for a in audits)
    assert first, "the audit saw the step's ops"
    assert len(first) == len(second), f"{len(first)} ops in one step, {len(second)} in the next"
    changed = [(i, a, b) for i, (a, b) in enumerate(zip(first, second)) if a != b]
    assert not changed, f"steps differ from op {changed[0][0]}: {changed[0][1]} then {changed[0][2]}"


@pytest.fixture(scope="module")
def content_32(content_small):
    """32 px: the audit's properties do not depend on size, and bf16 is emulated (slow) on AVX2-only CPUs."""
    return torch.nn.functional.interpolate(content_small, size=(32, 32), mode="area")


OPTIMISERS = {
    "lbfgs-static": {"name": "lbfgs", "history_size": 2, "cuda_graph": True},
    "lbfgs-ring": {"name": "lbfgs", "history_size": 2, "cuda_graph": False},
    "lbfgs-preconditioned": {"name": "lbfgs", "history_size": 2, "cuda_graph": True, "precondition_levels": 3},
    "adam": {"name": "adam", "lr": 2.0, "cuda_graph": True},
}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("max_iter", [1, 3])
@pytest.mark.parametrize("optimiser", sorted(OPTIMISERS))
def test_the_captured_step_makes_no_python_tensor_reads_nothing_back_and_repeats_itself(
    content_32, style_small, extractor, monkeypatch, optimiser, max_iter, precision
):
    # every default loss term on (content, style, chroma and border smoothness) plus TV and iterate averaging
    module = StyleTransferModule(content_32, style_small, extractor=extractor, loss={"tv_weight": 1e-6},
                                 optim={**OPTIMISERS[optimiser], "max_iter": max_iter, "average": 0.9})
    assert module.loss_config.chroma_weight > 0 and module.loss_config.border_weight > 0
    with audited_steps(monkeypatch) as audits:
        _fit(module, precision)
    _assert_capturable(audits)


def _variant(name: str, content: torch.Tensor, style: torch.Tensor) -> dict:
    """``masked``: two masked, blended styles, luminance colour, the temporal term and a mirrored margin at once;
    ``histogram``: the other colour mode."""
    if name == "histogram":
        return {"style": style, "color": "histogram"}
    h, w = content.shape[-2:]
    left = torch.zeros(1, 1, h, w)
    left[..., : w // 2] = 1.0
    reliable = torch.ones(1, 1, h, w)
    reliable[..., : h // 3, :] = 0.0
    return {"style": [style, style.flip(-1)], "style_masks": [left, 1.0 - left], "style_blend": [2.0, 1.0],
            "color": "luminance", "temporal": TemporalTarget(content.flip(-1), reliable, 0.5), "features": {"margin": 4}}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("variant", ["masked", "histogram"])
def test_masks_blends_colour_modes_the_temporal_term_and_margins_are_capture_safe(
    content_32, style_small, extractor, monkeypatch, variant, precision
):
    module = StyleTransferModule(content_32, extractor=extractor, optim={"history_size": 2, "cuda_graph": True},
                                 **_variant(variant, content_32, style_small))
    with audited_steps(monkeypatch) as audits:
        _fit(module, precision)
    _assert_capturable(audits)


def test_the_audit_refuses_what_a_capture_refuses():
    x = torch.ones(4, 4)
    for make in [lambda: x * x.new_tensor([1.0, 2.0, 3.0, 4.0]), lambda: x.sum().item(), lambda: torch.rand(2),
                 lambda: bool(x.sum() > 0)]:
        audit = CaptureAudit()
        with audit:
            make()
        assert audit.refused, make
    audit = CaptureAudit()
    with audit:
        torch.where(x > 0, x * 2.0, 0.0).sum()
    assert not audit.refused and len(audit.ops) >= 3


class DotAudit(TorchDispatchMode):
    """The dtypes of every matrix product (the optimiser's dot products are batched matmuls)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (aten.bmm, aten.mm, aten.dot, aten.mv, aten.matmul):
            self.dtypes.append(out.dtype)
        return out


@pytest.mark.parametrize("optimiser", ["lbfgs-static", "lbfgs-ring", "lbfgs-preconditioned", "adam"])
def test_under_bf16_mixed_the_optimiser_state_and_its_dot_products_stay_fp32(
    content_32, style_small, extractor, monkeypatch, optimiser
):
    autocast_seen: list[bool] = []
    dots: list[torch.dtype] = []
    update = {"adam": optim_module.BatchedAdam}.get(optimiser, optim_module.BatchedLBFGS).update

    def audited_update(self):
        autocast_seen.append(torch.is_autocast_enabled("cpu"))
        audit = DotAudit()
        with audit:
            update(self)
        dots.extend(audit.dtypes)

    cls = optim_module.BatchedAdam if optimiser == "adam" else optim_module.BatchedLBFGS
    monkeypatch.setattr(cls, "update", audited_update)
    module = StyleTransferModule(content_32, style_small, extractor=extractor,
                                 optim={**OPTIMISERS[optimiser], "max_iter": 2})
    _fit(module, "bf16-mixed", steps=4)
    optimizer = module.trainer.strategy.optimizers[0]
    state = optimizer.state[optimizer.param]
    if optimiser != "adam":
        assert dots and set(dots) == {torch.float32}, f"dot products in {sorted(set(map(str, dots)))}"
    assert len(autocast_seen) == 8 and not any(autocast_seen), "the update runs with autocast off"
    floats = {k: v.dtype for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}, floats
    assert module.image.dtype == torch.float32


class DeviceAudit(TorchDispatchMode):
    """The devices of every tensor each op reads or makes (0-dim tensors aside: CUDA kernels take them as scalars)."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                self.devices.setdefault(t.device.type, set()).add(str(func))
        return out


@pytest.mark.parametrize("variant", ["default", "masked", "histogram"])
def test_on_a_fake_cuda_device_targets_losses_masks_and_colour_run_there_and_nowhere_else(
    content_small, style_small, extractor, variant
):
    # FakeTensorMode makes CUDA tensors without a GPU (this torch build has CUDA compiled in); forward ops only
    inputs = {"style": style_small} if variant == "default" else _variant(variant, content_small, style_small)
    module = StyleTransferModule(content_small, extractor=extractor, **inputs)
    audit = DeviceAudit()
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_cuda = module.to("cuda")
        on_cuda.prepare_targets()  # before the first step: the images kept on the CPU are copied over once
        with audit, torch.no_grad():
            terms = on_cuda.loss_terms()
    assert set(audit.devices) == {"cuda"}, {k: sorted(v)[:5] for k, v in audit.devices.items() if k != "cuda"}
    assert {t.device.type for t in terms.values()} == {"cuda"}
    assert {b.device.type for b in on_cuda.criteria.buffers()} == {"cuda"}, "every target and constant is there"


def test_on_a_fake_cuda_device_flow_warping_and_its_weights_stay_there():
    audit = DeviceAudit()
    with FakeTensorMode(allow_non_fake_inputs=True):
        image = torch.rand(1, 3, 24, 32, device="cuda")
        flow, reverse = torch.zeros(1, 2, 24, 32, device="cuda"), torch.zeros(1, 2, 24, 32, device="cuda")
        with audit:
            warped, weights = warp(image, flow), consistency_weights(flow, reverse)
    assert set(audit.devices) == {"cuda"} and warped.device.type == weights.device.type == "cuda"


def test_on_a_fake_cuda_device_the_preconditioner_is_built_and_applied_there():
    audit = DeviceAudit()
    with FakeTensorMode(allow_non_fake_inputs=True):
        shape = torch.Size((2, 3, 24, 32))
        preconditioner = optim_module.SmoothingPreconditioner(3, 2.0, torch.device("cuda"))
        with audit:
            out = preconditioner(torch.rand(2, shape.numel() // 2, device="cuda"), shape)
    assert {k.device.type for _, k in preconditioner.blurs} == {"cuda"}, "kernels made once, on the device"
    assert set(audit.devices) == {"cuda"} and out.device.type == "cuda"


class ScalarAudit(TorchDispatchMode):
    """The Python numbers passed to ops: a capture bakes them into its kernels, so a later change is not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: list[float] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.numbers += [float(a) for a in tree_flatten((args, kwargs or {}))[0]
                         if isinstance(a, (int, float)) and not isinstance(a, bool)]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [optim_module.BatchedLBFGS, optim_module.BatchedAdam], ids=["lbfgs", "adam"])
def test_the_learning_rate_reaches_the_step_as_a_tensor_not_as_a_number_frozen_at_capture(make):
    lr = 0.0123456
    x = torch.linspace(-1, 1, 12).view(2, 6).requires_grad_(True)
    opt = make([x], lr=lr)

    def closure():
        x.grad = None
        loss = (x - 0.3).pow(4).sum()
        loss.backward()
        return loss

    audit = ScalarAudit()
    for _ in range(3):  # the captured region: step() fills the lr tensor before it, outside any graph
        opt._set_lr()
        with audit:
            opt._steps(closure)
    frozen = [n for n in audit.numbers if any(abs(abs(n) - v) < 1e-9 for v in (lr, 1 / lr))]
    assert not frozen, f"lr passed to ops as a Python number {frozen[:3]}"


@pytest.mark.parametrize("optimiser", ["lbfgs-static", "adam"])
def test_a_tiled_step_is_a_fixed_sequence_of_tile_passes_as_capture_safe_as_a_whole_one(
    content_32, style_small, extractor, monkeypatch, optimiser
):
    module = StyleTransferModule(content_32, style_small, extractor=extractor, features={"tile": 16},
                                 loss={"tv_weight": 1e-6}, optim={**OPTIMISERS[optimiser], "max_iter": 2})
    assert module.tile == 16
    with audited_steps(monkeypatch) as audits:
        _fit(module, "32-true")
    _assert_capturable(audits)
