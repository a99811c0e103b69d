"""The hardware's limit: peak memory bandwidth of known GPUs (common.catalog), or a measured device copy for anything
else; the roofline of a decode step against it; and the environment fingerprint every row carries."""
from __future__ import annotations

import os
import platform
import socket
import time
from functools import lru_cache
from importlib import metadata

import torch

from common.catalog import datasheet_bandwidth_gbs
from common.units import KvSpec
from tasks.kv_cache import analytic_bytes

def measure_copy_bandwidth_gbs(device: str, nbytes: int | None = None, repeats: int = 10) -> float:
    """Bytes read plus bytes written per second by a large device-to-device copy (torch's own copy kernel)."""
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


def nvml_handle(device: str):
    """NVML's handle of the torch device's GPU, found by its UUID (CUDA_VISIBLE_DEVICES renumbers torch's devices,
    not NVML's). Raises where NVML cannot tell (no driver, no pynvml)."""
    import pynvml

    pynvml.nvmlInit()
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)


def nvml_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:
        return None


def fingerprint(device: str) -> dict:
    cuda = device.startswith("cuda")
    return {
        "device": "cuda" if cuda else "cpu",
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_uuid": str(torch.cuda.get_device_properties(device).uuid) if cuda else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "driver_version": nvml_driver() if cuda else None,
        "cuda_version": torch.version.cuda,
        "torch_version": str(torch.__version__),  # a TorchVersion: unpickling it would import torch in the driver
        "transformers_version": _version("transformers"),
        "bitsandbytes_version": _version("bitsandbytes"),
        "accelerate_version": _version("accelerate"),
        "python_version": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "sdpa_backends": sdpa_backends(),
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF") or "",
        "host": socket.gethostname(),
        "worker_pid": os.getpid(),
    }


def sdpa_backends() -> str:
    """The attention backends torch may pick from, in its order of preference (which one runs depends on the
    shapes): cuDNN attention decodes ~20% faster on an H200 once it has built a plan for each sequence length, and
    building them makes a process's first generation 3-4x slower."""
    from torch.nn.attention import SDPBackend

    enabled = {"FLASH_ATTENTION": torch.backends.cuda.flash_sdp_enabled(),
               "EFFICIENT_ATTENTION": torch.backends.cuda.mem_efficient_sdp_enabled(),
               "MATH": torch.backends.cuda.math_sdp_enabled(), "CUDNN_ATTENTION": torch.backends.cuda.cudnn_sdp_enabled()}
    priority = getattr(torch._C, "_get_sdp_priority_order", None)  # private: every unit calls this, never raise
    order = [SDPBackend(i).name for i in priority()] if priority else list(enabled)
    return ",".join(b.removesuffix("_ATTENTION").lower() for b in order if enabled.get(b))


def roofline(weights_bytes: int, embedding_unread_bytes: int, geometry: dict, prompt: int, new_tokens: int,
             batch: int, kv: KvSpec | None, element: int, decode_ms: float | None, bw_gbs: float | None) -> dict:
    """Distance to the hardware limit: the bytes one decode step must read (weights, less an input embedding it
    does not read, plus the KV cache at its mean length over the generation), over the measured step time."""
    mean_context = prompt + new_tokens / 2
    step_bytes = weights_bytes - embedding_unread_bytes + analytic_bytes(geometry, prompt, mean_context, batch, kv,
                                                                          element)
    out = {"decode_bytes_per_step": int(step_bytes)}
    if decode_ms:
        achieved = step_bytes / (decode_ms / 1e3) / 1e9
        out["achieved_bandwidth_gbs"] = achieved
        out["bandwidth_fraction"] = achieved / bw_gbs if bw_gbs else None
        out["decode_ms_floor"] = step_bytes / (bw_gbs * 1e9) * 1e3 if bw_gbs else None
    return out
