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


@pytest.mark.parametrize(("gpu_bf16", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_precision_on_gpu_follows_the_device(monkeypatch, gpu_bf16, expected):
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda: gpu_bf16)
    assert hardware.resolve_precision("auto", "auto") == expected


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed"])
def test_explicit_precision_is_kept(explicit):
    assert hardware.resolve_precision(explicit, "cpu") == explicit


def test_cpu_flag_detection_reads_cpuinfo(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(hardware, "Path", lambda _: fake)
    assert hardware.cpu_has_bf16()
    fake.write_text("processor : 0\nflags : fpu sse avx2\n")
    assert not hardware.cpu_has_bf16()
