"""Precision `auto`: bf16 where the hardware has it natively, fp32 elsewhere, explicit choices untouched; CUDA
devices are asked through NVML, so nothing initialises CUDA in the launching process before the Trainer runs."""

from __future__ import annotations

import traceback

import lightning as L
import pytest
import torch

from nst_lightning import free_memory, hardware, resources
from nst_lightning.api import fit
from nst_lightning.errors import ConfigError

GiB = 1024**3


@pytest.mark.parametrize(
    ("has_bf16", "accelerator", "expected"),
    [(True, "auto", "bf16-mixed"), (True, "cpu", "bf16-mixed"), (False, "auto", "32-true"), (False, "cpu", "32-true")],
)
def test_auto_precision_on_cpu_follows_the_bf16_instructions(monkeypatch, has_bf16, accelerator, expected):
    monkeypatch.setattr(hardware.torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: has_bf16)
    assert hardware.resolve_precision("auto", accelerator) == expected


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), "bf16-mixed"), ((8, 0), "bf16-mixed"), ((7, 5), "32-true"), ((7, 0), "32-true")])
def test_auto_precision_on_gpu_takes_bf16_only_where_nvml_reports_it_native(monkeypatch, capability, expected):
    # T4 (7.5) and V100 (7.0) only emulate bf16, slower than fp32; A100 (8.0) and H100 (9.0) run it natively
    monkeypatch.setattr(hardware.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(hardware, "nvml_device", lambda index: hardware.NvmlDevice(capability, 10 * GiB, 16 * GiB))
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", _refuse("is_bf16_supported"))
    assert hardware.resolve_precision("auto", "auto") == expected


@pytest.mark.parametrize(("native", "emulated", "expected"), [(True, True, "bf16-mixed"), (False, True, "32-true"), (False, False, "32-true")])
def test_without_nvml_auto_precision_asks_cuda_for_native_bf16_only(monkeypatch, native, emulated, expected):
    monkeypatch.setattr(hardware.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(hardware, "nvml_device", lambda index: None)
    monkeypatch.setattr(
        hardware.torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or (including_emulation and emulated)
    )
    assert hardware.resolve_precision("auto", "auto") == expected


def _refuse(name: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.cuda.{name} initialises CUDA")

    return refuse


@pytest.fixture
def fake_cuda_machine(monkeypatch):
    """A machine with two Ampere GPUs as NVML reports them (20 and 30 GiB free); every call that would initialise
    CUDA in this process (all of them go through ``torch.cuda._lazy_init``) is recorded with its stack."""
    inits: list[str] = []

    def lazy_init():
        inits.append("".join(traceback.format_stack(limit=12)))
        raise AssertionError("CUDA initialised before the Trainer ran")

    free = {0: 20 * GiB, 1: 30 * GiB}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_lazy_init", lazy_init)
    monkeypatch.setattr(torch.cuda.memory, "_lazy_init", lazy_init)
    device = lambda index: hardware.NvmlDevice((8, 0), free[index], 40 * GiB)  # noqa: E731
    monkeypatch.setattr(hardware, "nvml_device", device)
    monkeypatch.setattr(free_memory, "nvml_device", device)
    return inits


@pytest.mark.parametrize("run", ["single", "folder"])
def test_nothing_initialises_cuda_before_the_trainer_fits(fake_cuda_machine, monkeypatch, tiny_config, tmp_path, run):
    from nst_lightning import fit_batch

    from .test_batch import make_frames

    class Reached(Exception):
        pass

    def fit_reached(trainer, *args, **kwargs):
        raise Reached(trainer)

    monkeypatch.setattr(L.Trainer, "fit", fit_reached)
    settings = {"trainer.accelerator": "auto", "trainer.precision": "auto"}
    if run == "folder":
        make_frames(tmp_path / "frames", 2)
        settings.update({"content": tmp_path / "frames", "trainer.devices": 2})  # DDP over both GPUs
    with pytest.raises(Reached) as reached:
        (fit if run == "single" else fit_batch)(tiny_config(steps=1, **settings), progress=False)
    assert fake_cuda_machine == []
    trainer = reached.value.args[0]
    assert trainer.strategy.root_device.type == "cuda" and trainer.precision == "bf16-mixed"


@pytest.mark.parametrize(("devices", "free"), [(1, 20), ([1], 30), (2, 20), ("auto", 20)])
def test_the_memory_check_reads_the_least_free_device_the_run_uses_through_nvml(fake_cuda_machine, tiny_config, devices, free):
    config = tiny_config(**{"trainer.accelerator": "gpu", "trainer.devices": devices})
    assert resources.target_device(config) == ("cuda", free * GiB - free_memory.CUDA_CONTEXT_BYTES)
    assert fake_cuda_machine == []


def test_a_required_cuda_graph_is_refused_on_a_machine_without_cuda(monkeypatch, tiny_config):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="optim.cuda_graph=true needs a CUDA device, but this run has none"):
        fit(tiny_config(**{"trainer.accelerator": "auto", "optim.cuda_graph": True}), progress=False)


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed"])
def test_explicit_precision_is_kept(explicit):
    assert hardware.resolve_precision(explicit, "cpu") == explicit


def test_cpu_flag_detection_reads_cpuinfo(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(hardware, "Path", lambda _: fake)
    monkeypatch.setattr(hardware.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert hardware.cpu_has_bf16()
    fake.write_text("processor : 0\nflags : fpu sse avx2 amx_bf16 amx_tile\n")
    assert hardware.cpu_has_bf16()
    fake.write_text("processor : 0\nflags : fpu sse avx2\n")
    assert not hardware.cpu_has_bf16()


@pytest.mark.parametrize(("capability", "isa"), [("AVX2", None), ("AVX512", "AVX2"), ("AVX512", "avx512_core")])
def test_a_cpu_limited_below_bf16_kernels_counts_as_without_bf16(monkeypatch, tmp_path, capability, isa):
    # ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA imitate an older CPU: auto must then choose as that CPU would
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16 amx_bf16\n")
    monkeypatch.setattr(hardware, "Path", lambda _: fake)
    monkeypatch.setattr(hardware.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert not hardware.cpu_has_bf16()
