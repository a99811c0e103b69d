"""Memory per phase. On a GPU: allocated after load (weights), peak during prefill and during decode with the peak
counters reset between phases, peak reserved, the KV cache (analytic, as cache tensors, and as allocator growth), and
this process's memory as NVML sees it. On CPU: resident set size after each phase (no per-phase peaks exist there)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import torch

from tasks.hardware import nvml_handle


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def allocated(device: str) -> int:
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) if _cuda(device) else rss()


def rss() -> int:
    return psutil.Process().memory_info().rss


def reset_peaks(device: str) -> None:
    if _cuda(device):
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def peak_allocated(device: str) -> int | None:
    if not _cuda(device):
        return None
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))


def peak_reserved(device: str) -> int | None:
    if not _cuda(device):
        return None
    return sum(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count()))


def alloc_retries(device: str) -> int | None:
    """Times the caching allocator found no free block, freed its cache and retried cudaMalloc, in this process so
    far: a peak reserved near the whole card with retries > 0 is fragmentation, not memory the cell needs."""
    if not _cuda(device):
        return None
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


def _nvml_processes(device: str) -> tuple[list[tuple[int, int | None]], int] | None:
    """([(pid, GPU bytes)] of every process on the unit's GPU, the GPU's used bytes) from NVML; None where NVML cannot
    tell (CPU, no driver)."""
    if not _cuda(device):
        return None
    try:
        import pynvml

        handle = nvml_handle(device)
        procs = {}
        for p in (pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                  + pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle)):
            procs[p.pid] = int(p.usedGpuMemory) if p.usedGpuMemory is not None else None
        return list(procs.items()), int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


def nvml_process_bytes(device: str) -> tuple[int | None, int | None]:
    """(this process's GPU memory, the whole GPU's used memory) from NVML; None where NVML cannot tell."""
    seen = _nvml_processes(device)
    if seen is None:
        return None, None
    procs, used = seen
    return dict(procs).get(os.getpid()), used


def other_gpu_processes(device: str) -> dict[int, int | None] | None:
    """Processes other than this one on the unit's GPU (pid -> GPU bytes): anything there shares the GPU's time and
    memory with the measurement (optimum-benchmark calls checking this device isolation). None where NVML cannot
    tell, or cannot see this process (another pid namespace: its pids would not be comparable)."""
    seen = _nvml_processes(device)
    if seen is None or os.getpid() not in dict(seen[0]):
        return None
    return {pid: b for pid, b in seen[0] if pid != os.getpid()}


@dataclass
class PhaseMemory:
    """Memory seen over one generation, phase by phase (bytes)."""
    device: str
    before: int = 0
    prefill_peak: int | None = None
    decode_peak: int | None = None
    after_prefill: int = 0
    after_decode: int = 0
    marks: dict = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        reset_peaks(self.device)
        yield
        if _cuda(self.device):
            torch.cuda.synchronize()
        setattr(self, f"{name}_peak", peak_allocated(self.device))
        setattr(self, f"after_{name}", allocated(self.device))
