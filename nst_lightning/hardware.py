"""What the machine offers: the precision that is fastest at equal quality on it.

Plain PyTorch; the benchmark (benchmarks/RESULTS.md) is the evidence for the choice.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
"""``ONEDNN_MAX_CPU_ISA`` values that keep oneDNN below its native bf16 kernels."""


def cpu_has_bf16() -> bool:
    """Whether bf16 convolutions run natively: the CPU has AVX512-BF16 or AMX and PyTorch may use them.

    ``ATEN_CPU_CAPABILITY=avx2`` or a lower ``ONEDNN_MAX_CPU_ISA`` (how one machine imitates an older CPU)
    leave bf16 emulated, so they count as no bf16.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    if not any(flag in flags for flag in BF16_CPU_FLAGS):
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() not in ONEDNN_ISAS_WITHOUT_BF16


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto`` becomes ``bf16-mixed`` where bf16 is native (GPU or CPU), else ``32-true``; others pass through.

    bf16 halves the time of the VGG convolutions at equal judged quality (Grams, losses, the image and
    the optimiser stay fp32).
    """
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if on_gpu:
        # emulated bf16 (V100, T4) is slower than fp32: only native support counts
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "32-true"
    return "bf16-mixed" if accelerator in ("auto", "cpu") and cpu_has_bf16() else "32-true"
