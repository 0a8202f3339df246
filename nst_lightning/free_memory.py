"""Free memory: what this process can still allocate on the CPU, and on a CUDA device without initialising CUDA.

Plain Python over ``/proc``, the cgroup files and NVML; the memory plan (``nst_lightning.resources``) reads it.
"""

from __future__ import annotations

from pathlib import Path

from .hardware import nvml_device

GiB = 1024**3


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def available_cpu_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, or less when a cgroup limit is lower; None if unknown."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit, usage in [("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")]:
        cap, used = _read_int(Path("/sys/fs/cgroup") / limit), _read_int(Path("/sys/fs/cgroup") / usage)
        if cap is not None and used is not None and cap < 1 << 60:
            found.append(max(0, cap - used))
    return min(found) if found else None


CUDA_CONTEXT_BYTES = GiB
"""What the run's own CUDA context (with cuBLAS and cuDNN handles) will take: NVML's free memory, read before
the context exists, does not count it yet (torch's ``mem_get_info`` afterwards would). An allowance, not a
measurement: gpu_check.py's peak figures are the check."""


def available_cuda_memory(index: int = 0) -> int:
    """Free bytes on CUDA device ``index`` for the run, asked through NVML so the launching process does not
    initialise CUDA (less the context the run will create)."""
    device = nvml_device(index)
    if device is not None:
        return max(0, device.free_bytes - CUDA_CONTEXT_BYTES)
    import torch

    free, _ = torch.cuda.mem_get_info(index)  # no NVML, or CUDA already initialised
    return int(free)


def cuda_indices(devices: int | str | list[int], count: int) -> list[int]:
    """The CUDA devices a Trainer with ``trainer.devices`` uses out of ``count`` visible ones (all for ``auto``/-1)."""
    if isinstance(devices, list):
        return list(devices)
    if isinstance(devices, int) and devices > 0:
        return list(range(min(devices, count)))
    if isinstance(devices, str) and devices.strip().isdigit() and int(devices) > 0:
        return list(range(min(int(devices), count)))
    return list(range(count))
