"""Energy from NVML's total-energy counter (millijoules since the driver loaded; NVIDIA GPUs from Volta on). The
counter moves in steps of tens of milliseconds, shorter than a decode step and often than a prefill, so it is read
around long stretches only: all timed runs of a cell together, and a loop of prefill-only runs of at least a second;
decode's share is the timed runs' energy less their prefills' (at the prefill loop's joules per token)."""
from __future__ import annotations

import time

import torch

from tasks.hardware import nvml_handle

MIN_PREFILL_LOOP_S = 1.0
CPU_REASON = "no energy counter on CPU (NVML's counter is an NVIDIA GPU's)"


class EnergyMeter:
    """Reads the unit's GPU's energy counter (joules), after the GPU has finished its queued work."""

    def __init__(self, device: str):
        self.device, self.handle, self.missing = device, None, None
        if not device.startswith("cuda"):
            self.missing = CPU_REASON
            return
        try:
            import pynvml

            self.handle = nvml_handle(device)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception as e:  # an older GPU, no NVML: the columns stay empty with the reason
            self.handle, self.missing = None, f"NVML energy counter unavailable ({type(e).__name__}: {e})"

    def joules(self) -> float:
        import pynvml

        torch.cuda.synchronize(self.device)
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3


def prefill_loop(meter: EnergyMeter, prefill_once) -> tuple[float, int, float]:
    """(joules, runs, seconds) of back-to-back prefills for at least MIN_PREFILL_LOOP_S (one run at least: a long
    prompt's prefill alone can take seconds, and it has already been warmed by the timed runs)."""
    e0, t0, runs = meter.joules(), time.perf_counter(), 0
    while runs < 1 or time.perf_counter() - t0 < MIN_PREFILL_LOOP_S:
        prefill_once()
        runs += 1
    e1 = meter.joules()
    return e1 - e0, runs, time.perf_counter() - t0


def columns(timed_j: float, timed_s: float, runs: int, prefill_j: float, prefill_runs: int, prefill_s: float,
            batch: int, prompt: int, new_tokens: int) -> dict:
    """Joules per prefill token and per decode token, mean power of the timed runs, generated tokens per kWh."""
    j_prefill_token = prefill_j / (prefill_runs * batch * prompt)
    decode_tokens = runs * batch * (new_tokens - 1)
    decode_j = timed_j - j_prefill_token * runs * batch * prompt
    return {
        "energy_j_per_prefill_token": j_prefill_token,
        "energy_j_per_decode_token": decode_j / decode_tokens if decode_tokens else None,
        "power_mean_w": timed_j / timed_s if timed_s else None,
        "tokens_per_kwh": runs * batch * new_tokens / (timed_j / 3.6e6) if timed_j > 0 else None,
        "energy_timed_j": timed_j,
        "energy_method": (f"NVML total-energy counter around all {runs} timed runs together ({timed_s:.2f} s) and "
                          f"around {prefill_runs} prefill-only runs ({prefill_s:.2f} s); decode = timed runs less "
                          f"their prefills"),
    }
