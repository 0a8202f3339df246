"""What the machine offers: the precision that is fastest at equal quality on it, and its CUDA devices.

Plain PyTorch; the benchmark (benchmarks/RESULTS.md) is the evidence for the choice. CUDA devices are
asked through NVML (the driver's management library), never through the CUDA runtime: the launching
process must not initialise CUDA before the Trainer starts, or fork-based strategies (``ddp_fork``,
notebooks) fail and every rank inherits a context it cannot use.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import torch

NATIVE_BF16_MAJOR = 8
"""CUDA compute capability from which bf16 runs natively (Ampere); below it, as on V100 and T4, it is emulated."""

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
    if cuda_run(accelerator):
        # emulated bf16 (V100, T4) is slower than fp32: only native support counts
        return "bf16-mixed" if cuda_has_native_bf16() else "32-true"
    return "bf16-mixed" if accelerator in ("auto", "cpu") and cpu_has_bf16() else "32-true"


def cuda_run(accelerator: str) -> bool:
    """Whether a Trainer with this ``accelerator`` computes on CUDA; counts devices through NVML (no CUDA init)."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.device_count() > 0


def cuda_has_native_bf16(index: int = 0) -> bool:
    """Whether CUDA device ``index`` has native bf16 (compute capability 8.0+), asked without initialising CUDA."""
    info = nvml_device(index)
    if info is not None:
        return info.capability[0] >= NATIVE_BF16_MAJOR
    return torch.cuda.is_bf16_supported(including_emulation=False)  # no NVML: only the runtime can tell


@dataclass(frozen=True)
class NvmlDevice:
    """What NVML says of one CUDA device."""

    capability: tuple[int, int]
    free_bytes: int
    total_bytes: int


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def nvml_device(index: int) -> NvmlDevice | None:
    """Compute capability and memory of CUDA device ``index`` (as torch numbers it, CUDA_VISIBLE_DEVICES applied)
    from NVML, without initialising CUDA; None where NVML or the device is not there (or CUDA already runs,
    where torch's own queries are free)."""
    if torch.cuda.is_initialized():
        return None
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
    except (OSError, AttributeError):
        return None
    try:
        handle = ctypes.c_void_p()
        major, minor, memory = ctypes.c_int(), ctypes.c_int(), _NvmlMemory()
        found = (
            nvml.nvmlDeviceGetHandleByIndex_v2(torch.cuda._get_nvml_device_index(index), ctypes.byref(handle)) == 0
            and nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) == 0
            and nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0
        )
        return NvmlDevice((major.value, minor.value), int(memory.free), int(memory.total)) if found else None
    except (AttributeError, RuntimeError, ValueError):
        return None
    finally:
        nvml.nvmlShutdown()
