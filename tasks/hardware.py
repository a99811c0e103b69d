"""The hardware's limit: peak memory bandwidth of known GPUs, or a measured device copy for anything else, and the
environment fingerprint every row carries."""
from __future__ import annotations

import os
import platform
import socket
import time
from functools import lru_cache
from importlib import metadata

# Datasheet peak memory bandwidth, GB/s. Matched against the CUDA device name, most specific first.
PEAK_BANDWIDTH_GBS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 4800.0),
    (("H100", "NVL"), 3900.0),
    (("H100", "PCIE"), 2000.0),
    (("H100",), 3350.0),            # SXM (HBM3): "NVIDIA H100 80GB HBM3"
    (("A100", "80GB", "PCIE"), 1935.0),
    (("A100", "80GB"), 2039.0),
    (("A100",), 1555.0),            # 40GB
    (("A10G",), 600.0),
    (("L40S",), 864.0),
    (("L4",), 300.0),
    (("T4",), 320.0),
]


def datasheet_bandwidth_gbs(device_name: str) -> float | None:
    name = device_name.upper()
    for words, gbs in PEAK_BANDWIDTH_GBS:
        if all(w in name for w in words):
            return gbs
    return None


def measure_copy_bandwidth_gbs(device: str, nbytes: int | None = None, repeats: int = 10) -> float:
    """Bytes read plus bytes written per second by a large device-to-device copy (torch's own copy kernel)."""
    import torch

    nbytes = nbytes or (1 << 30 if device.startswith("cuda") else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        stop.record()
        stop.synchronize()
        seconds = start.elapsed_time(stop) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    return 2 * nbytes * repeats / seconds / 1e9


@lru_cache(maxsize=None)
def peak_bandwidth(device: str) -> tuple[float, str]:
    """(GB/s, source): the datasheet figure for a known GPU, else a measured copy (also on CPU)."""
    if device.startswith("cuda"):
        import torch

        gbs = datasheet_bandwidth_gbs(torch.cuda.get_device_name(device))
        if gbs:
            return gbs, "datasheet"
    return measure_copy_bandwidth_gbs(device), "measured-copy"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Ray's accelerator types (the `accelerator_type:<name>` node resource) -> compute capability, to know before a sweep
# starts which precisions a cluster's GPUs cannot run
ACCELERATOR_CAPABILITY = {"V100": (7, 0), "T4": (7, 5), "A10G": (8, 6), "A10": (8, 6), "A100": (8, 0),
                          "L4": (8, 9), "L40S": (8, 9), "H100": (9, 0), "H200": (9, 0), "B200": (10, 0)}


def capability_of(accelerator: str | None) -> tuple[int, int] | None:
    """Compute capability of a Ray accelerator type name (e.g. "T4", "A100-80G"), None if unknown."""
    if not accelerator:
        return None
    name = accelerator.upper()
    return ACCELERATOR_CAPABILITY.get(name) or ACCELERATOR_CAPABILITY.get(name.split("-")[0])


def nvml_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:
        return None


def fingerprint(device: str) -> dict:
    import torch

    cuda = device.startswith("cuda")
    return {
        "device": "cuda" if cuda else "cpu",
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_uuid": str(torch.cuda.get_device_properties(device).uuid) if cuda else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "driver_version": nvml_driver() if cuda else None,
        "cuda_version": torch.version.cuda,
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),
        "bitsandbytes_version": _version("bitsandbytes"),
        "accelerate_version": _version("accelerate"),
        "python_version": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "worker_pid": os.getpid(),
    }
