"""Latency of greedy generation through the engine's plain steps (`prefill`, then `decode_one_token` from the KV
cache), exactly `new_tokens` new tokens, EOS ignored.

Timing is device-synchronised: on a GPU a CUDA event is recorded after every step and read once the run is over; the
host waits for the GPU once, after the prefill's event, so that decode starts with nothing queued (else the GPU runs
the first steps from the prefill's queue while the host falls behind, and a long prefill hides a slow host); no
other host sync inside the loop. On CPU the host clock is read after every step. Warm-up runs are untimed; the last one
measures memory phase by phase (see tasks.memory), on a freshly emptied allocator cache, so that no extra run is
spent on it (with no warm-up, one untimed run after the timed runs does).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from spec.stats import mean_interval, relative_halfwidth
from spec.units import KvSpec
from tasks import energy, host_cpu, memory

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


class Clock:
    """Marks on the device timeline (CUDA events on a GPU, the host clock on CPU), read after the run, and the host
    clock at each mark: how long the host took to issue each step. Where the host's gaps come close to the device's,
    the GPU waited for the host (Python, launches): the step is host-bound, and its time is the host's."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks: list = []
        self.host: list[float] = []
        self._event = (lambda: torch.cuda.Event(enable_timing=True)) if self.cuda else None

    def mark(self) -> None:
        now = time.perf_counter()
        if self.cuda:
            e = self._event()
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(now)
        self.host.append(now)

    def decode_starts(self) -> None:
        """Called after the prefill's mark: the GPU finishes the prefill before the first decode step is issued, and
        the host's clock restarts there. Without it the host issued decode steps while the GPU still ran the prefill,
        and the GPU ran them back to back from that queue: the host's time per step was hidden for as many steps as
        the prefill's lead covered (an H200, 11-30g: torchao-int4wo's 7B at batch 1, 3.1 ms a step on the GPU and 4.0
        on the host; in 11-30f the same cell at 1024 tokens, a 0.47 s prefill, measured 3.28 ms/token, at 128 tokens
        8.6). With it, a decode step's time is max(the GPU's, the host's), whatever the prompt's length. On CPU
        nothing is queued (the host clock is the device's)."""
        if self.cuda:
            torch.cuda.synchronize()
            self.host[-1] = time.perf_counter()

    def host_intervals_ms(self) -> list[float]:
        return _gaps_ms(self.host)

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return _gaps_ms(self.marks)


def _gaps_ms(seconds: list[float]) -> list[float]:
    """Milliseconds between consecutive host clock readings."""
    return [(b - a) * 1e3 for a, b in zip(seconds, seconds[1:])]


def empty_cache(model, kv: KvSpec | None, static_len: int | None, reuse=None):
    """`reuse` emptied in place (a compiled cell's static cache, whose addresses its CUDA graphs were recorded over),
    or a new cache: the engine's dynamic one, a static one of `static_len` tokens, or the cell's quantized `kv`."""
    if reuse is None:
        return model.new_cache(kv, static_len)
    model.reset_cache(reuse)
    return reuse


def generate(model, input_ids, new_tokens: int, clock: Clock | None = None, phases: memory.PhaseMemory | None = None,
             step=None, kv: KvSpec | None = None, cache=None):
    """Greedy generation of exactly `new_tokens` tokens with a loaded model (tasks.engines.Model); returns (tokens
    [batch, new_tokens], cache). `step`: a compiled decode step (`model.compiled_decode()`): then the cache is static
    and positions are explicit. `kv`: the cell's KV cache (None or native: the engine's dynamic cache). `cache`: one to
    empty and reuse (a compiled cell's static cache, whose addresses its CUDA graphs were recorded over), else a new
    one."""
    import contextlib

    phase = phases.phase if phases else (lambda name: contextlib.nullcontext())
    prompt = input_ids.shape[1]
    with torch.no_grad():  # not inference_mode: quanto's packed int4/int2 weights fail under it; one mode for all
        cache = empty_cache(model, kv, prompt + new_tokens if step else None, cache)
        positions = (lambda start, n: torch.arange(start, start + n, device=input_ids.device)) if step else \
            (lambda start, n: None)
        if clock:
            clock.mark()
        with phase("prefill"):
            token = model.prefill(input_ids, cache, positions(0, prompt))
        if clock:
            clock.mark()
            clock.decode_starts()
        out = [token]
        decode = step or model.decode_one_token
        with phase("decode"):
            for i in range(new_tokens - 1):
                token = decode(token, cache, positions(prompt + i, 1))
                if step is not None:
                    token = token.clone()  # CUDA graphs reuse their output buffer
                if clock:
                    clock.mark()
                out.append(token)
        return torch.cat(out, dim=1), cache


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


def profile_decode_step(model, ids, new_tokens: int, device: str, step=None, top: int = 10,
                        kv: KvSpec | None = None, cache=None) -> list[dict]:
    """One decode step (after a prefill and two unprofiled steps) under torch.profiler: the top kernels by GPU time
    on CUDA, the top operators by CPU time on CPU. Separate from the timed runs; the profiler's overhead is not in
    any latency. `cache`: a compiled cell's static cache to empty and reuse (it must hold 3 tokens past the prompt)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    static_len = ids.shape[1] + max(new_tokens, 4) if step else None
    decode = step or model.decode_one_token
    with torch.no_grad():
        cache = empty_cache(model, kv, static_len, cache)
        pos = (lambda p: torch.tensor([p], device=ids.device)) if step else (lambda p: None)
        token = model.prefill(ids, cache, torch.arange(ids.shape[1], device=ids.device) if step else None)
        for i in range(2):
            token = decode(token, cache, pos(ids.shape[1] + i)).clone()
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            decode(token, cache, pos(ids.shape[1] + 2))
            if cuda:
                torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        rows = [(e.key, e.count, e.self_device_time_total) for e in events if e.self_device_time_total > 0]
    else:
        rows = [(e.key, e.count, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]
    rows.sort(key=lambda r: -r[2])
    return [{"name": name[:200], "calls": int(calls), "time_us": float(us)} for name, calls, us in rows[:top]]


@dataclass
class CellMeasurement:
    record: LatencyRecord
    phases: memory.PhaseMemory
    cache_bytes: int                  # the memory run's KV cache: its bytes and bytes per element
    cache_element_size: int | None
    compile_s: float | None           # compiled decode: the first run, compilation included (not in the latency)
    graph_skips: int | None           # compiled decode on a GPU: calls of the step without CUDA graphs (inductor)
    kernels: list[dict] | None        # with profile: the top kernels of one decode step
    energy: dict                      # tasks.energy.columns, or {"energy_missing": why}
    host_cpu: dict                    # tasks.host_cpu: what other processes ran on the unit's CPUs meanwhile
    walls: dict                       # seconds of each part of the cell's work (warm-up, timed runs, ...)


def measure_cell(model, device: str, *, new_tokens: int, batch_size: int, prompt_tokens: int, warmup: int,
                 repeats: int, decode: str = "eager", profile: bool = False, kv: KvSpec | None = None,
                 max_repeats: int = 30, max_seconds: float = 60.0, target_halfwidth: float = 0.02) -> CellMeasurement:
    """Warm-up runs (the last one measures memory), timed repeats (on a GPU their energy, with untimed runs after them
    where they lasted less than energy.MIN_WINDOW_S, then a prefill-only loop for its share); with no warm-up, a
    memory run after the timed runs; with `profile`, one decode step under the profiler."""
    walls = {}
    ids = prompt_ids(model.tokenizer, model.vocab_size, prompt_tokens, batch_size, device)
    step, compile_s, static, skips = None, None, None, None
    if decode == "compiled":
        # one static cache for every run of the cell: a new one per run moved its tensors, and CUDA graph trees
        # recorded the decode step again at each run's first step (40-1200 ms in the timed runs on an H200, 11-30e)
        step, static = model.compiled_decode(), model.new_cache(kv, prompt_tokens + new_tokens)
        skips = graph_skips() if device.startswith("cuda") else None
        t0 = time.perf_counter()
        generate(model, ids, new_tokens, step=step, kv=kv, cache=static)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
    runs_s, phases = [], None
    for i in range(warmup):
        t0 = time.perf_counter()
        if i == warmup - 1:
            phases, cache_bytes, element_size = memory_run(model, ids, new_tokens, device, step, kv, static)
        else:
            generate(model, ids, new_tokens, step=step, kv=kv, cache=static)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        runs_s.append(time.perf_counter() - t0)
    walls.update(warmup_s=sum(runs_s), warmup_runs_s=runs_s,
                 memory_measured_in="the last warm-up run" if warmup else "a run after the timed runs")

    others = host_cpu.HostCpu()

    def run_once() -> tuple[list[float], list[float]]:
        clock = Clock(device)
        with others.run():  # until the device is done: a GPU-bound run's host returns while its steps still run
            tokens, cache = generate(model, ids, new_tokens, clock=clock, step=step, kv=kv, cache=static)
            intervals = clock.intervals_ms()  # waits for the run's last mark
        assert tokens.shape == (batch_size, new_tokens)
        del tokens, cache  # a run's own KV cache must not outlive it: the next run (and the memory run) would count it
        return intervals, clock.host_intervals_ms()

    def run_untimed() -> None:  # the same generation, for the energy window only
        tokens, cache = generate(model, ids, new_tokens, step=step, kv=kv, cache=static)
        torch.cuda.synchronize(device)
        del tokens, cache

    meter = energy.EnergyMeter(device)
    others.probe("before")  # the host's pace for plain Python around the timed runs (11-30j: an eager step's moved)
    e0 = meter.joules() if meter.handle else None
    t0 = time.perf_counter()
    record, stop = timed_runs(run_once, batch_size, new_tokens, repeats, max_repeats, max_seconds, target_halfwidth)
    record.stop, record.prompt_tokens = stop, prompt_tokens
    walls["timed_s"] = time.perf_counter() - t0
    if meter.handle:  # the window goes on with untimed runs until it spans enough of the counter's updates
        extra = energy.fill_window(run_untimed, t0)
        window_j, window_s = meter.joules() - e0, time.perf_counter() - t0
        walls["energy_untimed_s"] = window_s - walls["timed_s"]
    others.probe("after")
    if meter.handle:
        t1 = time.perf_counter()
        prefill_j, prefill_runs, prefill_s = energy.prefill_loop(meter, lambda: prefill_only(model, ids, kv, static))
        walls["energy_prefill_s"] = time.perf_counter() - t1
        timed = len(record.ttft_ms)
        used = energy.columns(window_j, window_s, timed + extra, timed, prefill_j, prefill_runs, prefill_s,
                              batch_size, prompt_tokens, new_tokens, meter.update_ms)
    else:
        used = {"energy_missing": meter.missing}
    if phases is None:
        t0 = time.perf_counter()
        phases, cache_bytes, element_size = memory_run(model, ids, new_tokens, device, step, kv, static)
        walls["memory_run_s"] = time.perf_counter() - t0
    skips = graph_skips() - skips if skips is not None else None  # the profiled step below is not counted
    kernels = None
    if profile:  # in the cell's static cache where it is long enough: at the edge of memory two would not fit
        t0 = time.perf_counter()
        reuse, static = (static if new_tokens >= 3 else None), None
        kernels = profile_decode_step(model, ids, new_tokens, device, step, kv=kv, cache=reuse)
        walls["profile_s"] = time.perf_counter() - t0
    return CellMeasurement(record, phases, cache_bytes, element_size, compile_s, skips, kernels, used, others.columns(),
                           walls)


def graph_skips() -> int:
    """Inductor's count of calls it ran without CUDA graphs (it logs why: TORCH_LOGS=cudagraphs)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def memory_run(model, ids, new_tokens: int, device: str, step, kv: KvSpec | None, static=None):
    """One generation with memory read phase by phase, from an emptied allocator cache: (phases, the KV cache's
    bytes, its bytes per element). The cache is dropped here: it must not outlive the run (the timed runs that follow
    would count it, and at the edge of the GPU's memory it would not fit twice). A compiled cell's `static` cache,
    held from its first run, is reused and counted as if this run had allocated it (out of `before`), as a new one
    was."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    phases = memory.PhaseMemory(device)
    phases.before = memory.allocated(device) - (model.cache_bytes(static) if static is not None and
                                                device.startswith("cuda") else 0)
    _, cache = generate(model, ids, new_tokens, phases=phases, step=step, kv=kv, cache=static)
    nbytes, element_size = model.cache_bytes(cache), model.cache_element_size(cache)
    del cache
    return phases, nbytes, element_size


def prefill_only(model, ids, kv: KvSpec | None, static=None):
    """A prefill as the cell's runs make it: into a new cache, or into the compiled cell's static one (emptied)."""
    with torch.no_grad():
        model.prefill(ids, empty_cache(model, kv, None, static),
                      None if static is None else torch.arange(ids.shape[1], device=ids.device))
