"""Precision `auto`: bf16 where the hardware has it natively, fp32 elsewhere, explicit choices untouched."""

from __future__ import annotations

import pytest

from nst_lightning import hardware


@pytest.mark.parametrize(
    ("has_bf16", "accelerator", "expected"),
    [(True, "auto", "bf16-mixed"), (True, "cpu", "bf16-mixed"), (False, "auto", "32-true"), (False, "cpu", "32-true")],
)
def test_auto_precision_on_cpu_follows_the_bf16_instructions(monkeypatch, has_bf16, accelerator, expected):
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: has_bf16)
    assert hardware.resolve_precision("auto", accelerator) == expected


@pytest.mark.parametrize(("native", "emulated", "expected"), [(True, True, "bf16-mixed"), (False, True, "32-true"), (False, False, "32-true")])
def test_auto_precision_on_gpu_takes_bf16_only_where_it_is_native(monkeypatch, native, emulated, expected):
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        hardware.torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or (including_emulation and emulated)
    )
    assert hardware.resolve_precision("auto", "auto") == expected


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
