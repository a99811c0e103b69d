"""Latency of a cell: exactly `new_tokens` new tokens for a batch of prompts, through the engine's prepared
generation (tasks.engines.Generation), which times each run on the device. Warm-up runs are untimed; the last one
measures memory phase by phase, on a freshly emptied allocator cache, so that no extra run is spent on it (with no
warm-up, one untimed run after the timed runs does). On a GPU the timed runs' energy is read around a window of at
least common.catalog.ENERGY_WINDOW_S (tasks.energy), and a prefill-only loop gives the prompt's share.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from common.stats import mean_interval, relative_halfwidth
from common.units import KvSpec
from tasks import energy, host_cpu
from tasks.engines import MemoryRun

# Prompts for real models are cut from this text (written for this project; deterministic).
PROMPT_TEXT = (
    "The river town woke slowly. Fishermen pulled their boats onto the gravel while the baker opened the shutters "
    "and set out the first loaves of the day. Along the harbour wall, gulls argued over scraps, and a ferry sounded "
    "its horn as it left for the islands. In the square, the clock had stopped at a quarter past nine years ago, and "
    "nobody had thought it worth the cost of repair. Children crossed the bridge on their way to school, counting "
    "the barges moored below, and the old librarian unlocked the reading room, where the morning light fell across "
    "long tables of maps, ledgers and letters that recorded two centuries of trade along the coast. "
)
NOISY_CV = 0.05


def prompt_ids(tokenizer, vocab_size: int, prompt_tokens: int, batch: int, device: str):
    """[batch, prompt_tokens] ids: real text for a model with a tokenizer (row b starts b*11 tokens further on),
    seeded random ids otherwise."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (batch, prompt_tokens), generator=g).to(device)
    ids = tokenizer(PROMPT_TEXT, add_special_tokens=False).input_ids
    need = prompt_tokens + 11 * batch
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor([ids[11 * b:11 * b + prompt_tokens] for b in range(batch)], device=device)


@dataclass
class LatencyRecord:
    """Raw timings of the timed repeats of one cell; `summary()` turns them into row columns."""
    batch_size: int
    new_tokens: int
    ttft_ms: list[float] = field(default_factory=list)          # one per repeat
    decode_ms: list[list[float]] = field(default_factory=list)  # per repeat, the gaps between consecutive tokens
    decode_host_ms: list[list[float]] = field(default_factory=list)  # per repeat, the host's gaps (issuing the steps)
    stop: str = "fixed"                                          # why the timed runs stopped (see timed_runs)
    prompt_tokens: int = 0

    def add(self, intervals_ms: list[float], host_ms: list[float] | None = None) -> None:
        """One run's intervals (ms), the device's and, where read, the host's: the first is the run's time to first
        token, the rest its decode gaps."""
        self.ttft_ms.append(intervals_ms[0])
        self.decode_ms.append(intervals_ms[1:])
        if host_ms is not None:
            self.decode_host_ms.append(host_ms[1:])

    @property
    def per_run_decode(self) -> list[float]:
        return [float(np.mean(r)) for r in self.decode_ms if r]

    def summary(self) -> dict:
        gaps = np.array([g for run in self.decode_ms for g in run], dtype=float)
        per_run_decode = self.per_run_decode
        e2e_s = [(t + sum(r)) / 1e3 for t, r in zip(self.ttft_ms, self.decode_ms)]
        cv_decode = _cv(per_run_decode)
        cv_ttft = _cv(self.ttft_ms)
        mean_gap = float(gaps.mean()) if gaps.size else None
        host = [g for run in self.decode_host_ms for g in run]
        return {
            "ttft_ms": statistics.median(self.ttft_ms),
            "prefill_tokens_per_s": (self.batch_size * self.prompt_tokens * 1e3 / statistics.median(self.ttft_ms)
                                     if self.prompt_tokens else None),
            "ttft_ms_mean": statistics.fmean(self.ttft_ms),
            "decode_ms_per_token": mean_gap,
            "decode_ms_p50": float(np.percentile(gaps, 50)) if gaps.size else None,
            "decode_ms_p90": float(np.percentile(gaps, 90)) if gaps.size else None,
            "decode_ms_p99": float(np.percentile(gaps, 99)) if gaps.size else None,
            "decode_tokens_per_s": self.batch_size * 1e3 / mean_gap if mean_gap else None,
            "decode_host_ms_per_token": statistics.fmean(host) if host else None,
            "e2e_s": statistics.fmean(e2e_s),
            "e2e_tokens_per_s": self.batch_size * self.new_tokens / statistics.fmean(e2e_s),
            "cv_ttft": cv_ttft,
            "cv_decode": cv_decode,
            "noisy_timing": any(cv is not None and cv > NOISY_CV for cv in (cv_ttft, cv_decode)),
            **_interval("ttft_ms", self.ttft_ms),
            **_interval("decode_ms", per_run_decode),
            "decode_ci_rel_halfwidth": relative_halfwidth(per_run_decode),
            "repeats_done": len(self.ttft_ms),
            "repeats_stop": self.stop,
            "ttft_ms_samples": list(self.ttft_ms),
            "decode_ms_samples": [float(g) for g in gaps],
            "e2e_s_samples": e2e_s,
        }


def _interval(name: str, values: list[float]) -> dict:
    iv = mean_interval(values)
    return {f"{name}_ci_low": iv[1] if iv else None, f"{name}_ci_high": iv[2] if iv else None}


def timed_runs(run_once, batch_size: int, new_tokens: int, repeats: int, max_repeats: int = 30,
               max_seconds: float = 60.0, target_halfwidth: float = 0.02, min_repeats: int = 3):
    """Timed runs into a LatencyRecord. `run_once()` times one generation and returns its intervals (ms: the first
    token, then every decode gap), the device's and the host's (or None). A fixed number of `repeats`; or, with
    repeats 0 (auto), until the 95% interval of the per-run mean decode gap is within `target_halfwidth` of the mean
    (after at least `min_repeats` runs), or `max_repeats` runs, or `max_seconds` of timed work. Returns (record, why
    it stopped)."""
    record = LatencyRecord(batch_size, new_tokens)
    if repeats:
        for _ in range(repeats):
            record.add(*run_once())
        return record, "fixed"
    spent = 0.0
    while True:
        intervals, host = run_once()
        record.add(intervals, host)
        spent += sum(intervals) / 1e3
        n = len(record.ttft_ms)
        half = relative_halfwidth(record.per_run_decode)
        if n >= min_repeats and half is not None and half <= target_halfwidth:
            return record, "target"
        if n >= max_repeats:
            return record, "max_repeats"
        if spent >= max_seconds:
            return record, "max_seconds"


def _cv(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean else None


@dataclass
class CellMeasurement:
    record: LatencyRecord
    memory: MemoryRun                 # the memory run: phase by phase, and its KV cache
    compile_s: float | None           # preparing the generation (compilation), not in the latency
    counters: dict                    # the engine's counters over the cell's runs (cudagraph_skips)
    kernels: list[dict] | None        # with profile: the top kernels of one decode step
    energy: dict                      # tasks.energy.columns, or {"energy_missing": why}
    host_cpu: dict                    # tasks.host_cpu: what other processes ran on the unit's CPUs meanwhile
    walls: dict                       # seconds of each part of the cell's work (warm-up, timed runs, ...)
    timing_source: str                # how the engine timed the runs


def measure_cell(model, device: str, *, new_tokens: int, batch_size: int, prompt_tokens: int, warmup: int,
                 repeats: int, decode: str = "eager", profile: bool = False, kv: KvSpec | None = None,
                 max_repeats: int = 30, max_seconds: float = 60.0, target_halfwidth: float = 0.02) -> CellMeasurement:
    """Warm-up runs (the last one measures memory), timed repeats (on a GPU their energy, with untimed runs after them
    until the window is long enough, then a prefill-only loop for its share); with no warm-up, a memory run after the
    timed runs; with `profile`, one decode step under the profiler."""
    walls = {}
    ids = prompt_ids(model.tokenizer, model.vocab_size, prompt_tokens, batch_size, device)
    gen = model.generation(ids, new_tokens, decode, kv)
    try:
        return _measure(gen, device, walls, batch_size, new_tokens, prompt_tokens, warmup, repeats, profile,
                        max_repeats, max_seconds, target_halfwidth)
    finally:
        gen.close()


def _measure(gen, device, walls, batch_size, new_tokens, prompt_tokens, warmup, repeats, profile, max_repeats,
             max_seconds, target_halfwidth) -> CellMeasurement:
    runs_s, mem = [], None
    for i in range(warmup):
        t0 = time.perf_counter()
        if i == warmup - 1:
            mem = gen.memory_run()
        else:
            gen.run_untimed()
        runs_s.append(time.perf_counter() - t0)
    walls.update(warmup_s=sum(runs_s), warmup_runs_s=runs_s,
                 memory_measured_in="the last warm-up run" if warmup else "a run after the timed runs")

    others = host_cpu.HostCpu()

    def run_once():
        with others.run():  # until the device is done: a GPU-bound run's host returns while its steps still run
            r = gen.run()
        return r.intervals_ms, r.host_ms

    meter = energy.EnergyMeter(device)
    others.probe("before")  # the host's pace for plain Python around the timed runs
    e0 = meter.joules() if meter.handle else None
    t0 = time.perf_counter()
    record, stop = timed_runs(run_once, batch_size, new_tokens, repeats, max_repeats, max_seconds, target_halfwidth)
    record.stop, record.prompt_tokens = stop, prompt_tokens
    walls["timed_s"] = time.perf_counter() - t0
    if meter.handle:  # the window goes on with untimed runs until it spans enough of the counter's updates
        extra = energy.fill_window(gen.run_untimed, t0)
        window_j, window_s = meter.joules() - e0, time.perf_counter() - t0
        walls["energy_untimed_s"] = window_s - walls["timed_s"]
    others.probe("after")
    if meter.handle:
        t1 = time.perf_counter()
        prefill_j, prefill_runs, prefill_s = energy.prefill_loop(meter, gen.prefill_only)
        walls["energy_prefill_s"] = time.perf_counter() - t1
        timed = len(record.ttft_ms)
        used = energy.columns(window_j, window_s, timed + extra, timed, prefill_j, prefill_runs, prefill_s,
                              batch_size, prompt_tokens, new_tokens, meter.update_ms)
    else:
        used = {"energy_missing": meter.missing}
    if mem is None:
        t0 = time.perf_counter()
        mem = gen.memory_run()
        walls["memory_run_s"] = time.perf_counter() - t0
    counters = gen.counters()  # the profiled step below is not counted
    kernels = None
    if profile:
        t0 = time.perf_counter()
        kernels = gen.profile()
        walls["profile_s"] = time.perf_counter() - t0
    return CellMeasurement(record, mem, gen.compile_s, counters, kernels, used, others.columns(), walls,
                           gen.timing_source)


def measure_throughput(model, device: str, *, requests: int, prompt_tokens: int, new_tokens: int, decode: str,
                       repeats: int) -> dict:
    """Offline throughput: `requests` prompts of `prompt_tokens` handed to the engine together, each generating
    exactly `new_tokens`; generated tokens per wall-clock second from handing them over to the last token (prefill
    included), one warm-up then `repeats` timed runs (at least 3), device-synchronised at both ends."""
    ids = prompt_ids(model.tokenizer, model.vocab_size, prompt_tokens, requests, device)
    gen = model.generation(ids, new_tokens, decode, None)
    try:
        gen.run_untimed()
        walls = []
        for _ in range(max(repeats, 3)):
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            gen.run_untimed()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            walls.append(time.perf_counter() - t0)
    finally:
        gen.close()
    rates = [requests * new_tokens / w for w in walls]
    mean, low, high = mean_interval(rates)
    return {"throughput_tokens_per_s": mean, "throughput_ci_low": low, "throughput_ci_high": high,
            "throughput_s_samples": walls, "throughput_requests": requests,
            "throughput_prompt_tokens": prompt_tokens, "throughput_new_tokens": new_tokens,
            "throughput_decode": decode}
