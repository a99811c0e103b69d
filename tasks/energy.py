"""Energy from NVML's total-energy counter (millijoules since the driver loaded; NVIDIA GPUs from Volta on). The counter
moves in steps: every 100 ms on an H200, idle or busy, longer than a decode step and often than a whole generation.
So it is read around windows of MIN_WINDOW_S at least: the timed runs, followed by untimed runs of the same
generation where they were shorter, and a loop of prefill-only runs; decode's share is the generations' energy less
their prefills' (at the prefill loop's joules per token). A reading lags the work by up to one update at each end of
a window, so each figure carries a bound: one update's energy at the window's mean power (the update interval is
measured once per GPU and process)."""
from __future__ import annotations

import statistics
import time

import torch

from common.catalog import ENERGY_WINDOW_S as MIN_WINDOW_S  # 20 of the H200's counter updates: edges move 5% at most
from tasks.hardware import nvml_handle

CPU_REASON = "no energy counter on CPU (NVML's counter is an NVIDIA GPU's)"
_UPDATE_MS: dict[str, float | None] = {}


def changes(samples: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(seconds, joules) at each poll whose reading differs from the one before; the first poll's reading starts it."""
    out = samples[:1]
    for t, j in samples[1:]:
        if j != out[-1][1]:
            out.append((t, j))
    return out


def update_gaps_ms(samples: list[tuple[float, float]]) -> list[float]:
    """ms between the counter's changes, from its first change on (whole update intervals only)."""
    moved = changes(samples)[1:]
    return [(b[0] - a[0]) * 1e3 for a, b in zip(moved, moved[1:])]


def update_interval_ms(read, clock=time.perf_counter, max_s: float = 1.0) -> float | None:
    """The counter's update interval: polls `read` until it has changed three times (two whole intervals between
    them) or for `max_s`, and gives the median ms between changes; None where it moved less."""
    samples, changed, end = [], 0, clock() + max_s
    while changed < 3 and (t := clock()) < end:
        j = read()
        changed += bool(samples) and j != samples[-1][1]
        samples.append((t, j))
    gaps = update_gaps_ms(samples)
    return statistics.median(gaps) if len(gaps) >= 2 else None


class EnergyMeter:
    """Reads the energy counters of the unit's GPUs (joules, summed over every GPU the process sees: Ray makes those
    the unit's own), after the GPUs have finished their queued work."""

    def __init__(self, device: str):
        self.device, self.handle, self.missing, self.update_ms = device, None, None, None
        if not device.startswith("cuda"):
            self.missing = CPU_REASON
            return
        try:
            import pynvml

            self.devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or [device]
            self.handles = [nvml_handle(d) for d in self.devices]
            self.handle = self.handles[0]
            self.reading()
        except Exception as e:  # an older GPU, no NVML: the columns stay empty with the reason
            self.handle, self.missing = None, f"NVML energy counter unavailable ({type(e).__name__}: {e})"
            return
        if device not in _UPDATE_MS:
            # one GPU's counter: the sum over several changes whenever any of them updates, out of phase
            _UPDATE_MS[device] = update_interval_ms(
                lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3)
        self.update_ms = _UPDATE_MS[device]

    def reading(self) -> float:
        """The counter now (joules), whatever the GPU still has queued."""
        import pynvml

        return sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles) / 1e3

    def joules(self) -> float:
        for d in self.devices:
            torch.cuda.synchronize(d)
        return self.reading()


def fill_window(run_once, t0: float, clock=time.perf_counter) -> int:
    """Runs `run_once` (an untimed generation, synchronized) until the window that began at `t0` has lasted
    MIN_WINDOW_S; how many it ran (none where the timed runs already lasted that long)."""
    runs = 0
    while clock() - t0 < MIN_WINDOW_S:
        run_once()
        runs += 1
    return runs


def prefill_loop(meter: EnergyMeter, prefill_once) -> tuple[float, int, float]:
    """(joules, runs, seconds) of back-to-back prefills for at least MIN_WINDOW_S (one run at least: a long prompt's
    prefill alone can take seconds, and it has already been warmed by the timed runs)."""
    e0, t0, runs = meter.joules(), time.perf_counter(), 0
    while runs < 1 or time.perf_counter() - t0 < MIN_WINDOW_S:
        prefill_once()
        runs += 1
    e1 = meter.joules()
    return e1 - e0, runs, time.perf_counter() - t0


def columns(window_j: float, window_s: float, runs: int, timed_runs: int, prefill_j: float, prefill_runs: int,
            prefill_s: float, batch: int, prompt: int, new_tokens: int, update_ms: float | None) -> dict:
    """Joules per prefill token and per decode token with the counter's bound on each, the mean power of the
    generations' window, generated tokens per kWh. `runs` generations in the window, the first `timed_runs` timed."""
    prompt_tokens = batch * prompt
    j_prefill_token = prefill_j / (prefill_runs * prompt_tokens)
    decode_tokens = runs * batch * (new_tokens - 1)
    decode_j = window_j - j_prefill_token * runs * prompt_tokens
    bound = {}
    if update_ms is not None:  # one update's energy at each window's mean power, spread over what the window held
        prefill_bound = update_ms / 1e3 * prefill_j / prefill_s / (prefill_runs * prompt_tokens)
        bound["energy_j_per_prefill_token_bound"] = prefill_bound
        if decode_tokens:
            bound["energy_j_per_decode_token_bound"] = (update_ms / 1e3 * window_j / window_s
                                                        + prefill_bound * runs * prompt_tokens) / decode_tokens
    extra = runs - timed_runs
    return {
        "energy_j_per_prefill_token": j_prefill_token,
        "energy_j_per_decode_token": decode_j / decode_tokens if decode_tokens else None,
        **bound,
        "power_mean_w": window_j / window_s if window_s else None,
        "tokens_per_kwh": runs * batch * new_tokens / (window_j / 3.6e6) if window_j > 0 else None,
        "energy_window_j": window_j,
        "energy_window_s": window_s,
        "energy_runs": runs,
        "energy_counter_update_ms": update_ms,
        "energy_method": (f"NVML total-energy counter around the {timed_runs} timed runs"
                          + (f" and {extra} untimed one(s) after them" if extra else "")
                          + f" ({window_s:.2f} s) and around {prefill_runs} prefill-only runs ({prefill_s:.2f} s); "
                          f"decode = generations less their prefills; counter update "
                          + (f"{update_ms:.0f} ms" if update_ms is not None else "not measured (it did not move)")),
    }
