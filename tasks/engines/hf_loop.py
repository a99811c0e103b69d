"""transformers' generation, written out as plain steps (gpt-fast's spirit): `prefill` (the prompt, giving the first
token) and `decode_one_token` (one more token from the KV cache), greedy, exactly N tokens; the KV caches; and one
cell's prepared generation (tasks.engines.Generation) over them.

Timing is device-synchronised: on a GPU a CUDA event is recorded after every step and read once the run is over; the
host waits for the GPU once, after the prefill's event, so that decode starts with nothing queued (a long prefill's
queue would otherwise let the GPU run the first steps back to back while a slower host fell behind); no other host sync
inside the loop. On CPU the host clock is read after every step.

KV caches: DynamicCache in the model's dtype (native), a StaticCache of a fixed length (compiled decode: one per cell,
emptied in place between runs, so that the CUDA graphs recorded over its tensors replay), or a QuantizedCache
(KIVI-style: keys and values quantized per group of `q_group_size`, the newest tokens in full precision in a residual of
at most `residual_length - 1` tokens, re-quantized every `residual_length` steps; the prompt is quantized at prefill).
"""
from __future__ import annotations

import contextlib
import time

import torch

from common.catalog import KV_CACHES
from common.units import KvSpec
from tasks import memory
from tasks.engines import MemoryRun, Run
from tasks.weights import stored_tensors


def prefill(module, input_ids, cache, cache_position=None):
    out = module(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                 cache_position=cache_position)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def decode_one_token(module, token, cache, cache_position=None):
    out = module(input_ids=token, past_key_values=cache, use_cache=True, cache_position=cache_position)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def compiled_decode_step(device: str):
    """`decode_one_token` through torch.compile (fullgraph; CUDA graphs on a GPU via "reduce-overhead"). Dynamo's
    caches are reset first, so each cell compiles for its own shapes and never hits the recompile limit (past it,
    torch.compile silently runs eager)."""
    torch._dynamo.reset()
    mode = "reduce-overhead" if device.startswith("cuda") else None
    return torch.compile(decode_one_token, fullgraph=True, dynamic=False, mode=mode)


# ----------------------------------------------------------------------------------------------------- KV caches

def new_cache(module, kv: KvSpec | None = None, static_len: int | None = None):
    """DynamicCache, a StaticCache of `static_len` tokens (compiled decode), or a QuantizedCache."""
    from transformers import DynamicCache, QuantizedCache, StaticCache

    spec = KV_CACHES[kv.name] if kv else None
    if spec is not None:
        backend, bits = spec
        return QuantizedCache(backend=backend, config=module.config, nbits=bits, q_group_size=kv.options["q_group_size"],
                              residual_length=kv.options["residual_length"])
    if static_len:
        return StaticCache(config=module.config, max_cache_len=static_len)
    return DynamicCache(config=module.config)


def empty_cache(module, kv: KvSpec | None, static_len: int | None, reuse=None):
    """`reuse` emptied in place (a StaticCache keeps its tensors, zeroed, so CUDA graphs recorded over them replay;
    a new one's tensors land wherever the allocator puts them, and every graph over other addresses is recorded
    again), or a new cache."""
    if reuse is None:
        return new_cache(module, kv, static_len)
    reuse.reset()
    return reuse


def _hqq_meta_tensors(meta: dict):
    for v in meta.values():
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, dict):  # quantized scales/zeros keep their own meta
            yield from _hqq_meta_tensors(v)


def cache_bytes(cache) -> int:
    """Bytes the cache holds: full-precision keys/values (the residual, for a quantized cache) plus the quantized
    states (quanto's packed tensor subclass flattened; HQQ's packed tensor plus the scale/zero in its meta)."""
    seen: dict[int, int] = {}

    def add(t) -> None:
        for inner in stored_tensors(t):
            if inner.numel():
                seen.setdefault(inner.data_ptr(), inner.numel() * inner.element_size())

    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                add(t)
            elif isinstance(t, tuple):  # HQQ: (packed tensor, meta)
                add(t[0])
                for m in _hqq_meta_tensors(t[1]):
                    add(m)
    return sum(seen.values())


def cache_element_size(cache) -> int | None:
    """Bytes of one element in the cache's full-precision part (the model's activation dtype)."""
    for layer in getattr(cache, "layers", []):
        t = getattr(layer, "keys", None)
        if t is not None and hasattr(t, "element_size"):
            return t.element_size()
    return None


# ---------------------------------------------------------------------------------------------------------- timing

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
        the host's clock restarts there, so a decode step's time is max(the GPU's, the host's) whatever the prompt's
        length. On CPU nothing is queued (the host clock is the device's)."""
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


def generate(module, input_ids, new_tokens: int, clock: Clock | None = None,
             phases: memory.PhaseMemory | None = None, step=None, kv: KvSpec | None = None, cache=None):
    """Greedy generation of exactly `new_tokens` tokens; returns (tokens [batch, new_tokens], cache). `step`: a
    compiled decode step: then the cache is static and positions are explicit. `kv`: the cell's KV cache (None or
    native: a dynamic one). `cache`: one to empty and reuse (a compiled cell's static cache), else a new one."""
    phase = phases.phase if phases else (lambda name: contextlib.nullcontext())
    prompt = input_ids.shape[1]
    with torch.no_grad():  # not inference_mode: quanto's packed int4/int2 weights fail under it; one mode for all
        cache = empty_cache(module, kv, prompt + new_tokens if step else None, cache)
        positions = (lambda start, n: torch.arange(start, start + n, device=input_ids.device)) if step else \
            (lambda start, n: None)
        if clock:
            clock.mark()
        with phase("prefill"):
            token = prefill(module, input_ids, cache, positions(0, prompt))
        if clock:
            clock.mark()
            clock.decode_starts()
        out = [token]
        with phase("decode"):
            for i in range(new_tokens - 1):
                if step is not None:
                    token = step(module, token, cache, positions(prompt + i, 1)).clone()  # graphs reuse their output
                else:
                    token = decode_one_token(module, token, cache)
                if clock:
                    clock.mark()
                out.append(token)
        return torch.cat(out, dim=1), cache


def graph_skips() -> int:
    """Inductor's count of calls it ran without CUDA graphs (it logs why: TORCH_LOGS=cudagraphs)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


class HFGeneration:
    """One cell's generation through transformers (tasks.engines.Generation): eager, or compiled with one static
    cache for every run of the cell (a new one per run moved its tensors, and CUDA graph trees recorded the decode
    step again at each run's first step, inside the timed runs)."""

    def __init__(self, module, ids, new_tokens: int, decode: str, kv: KvSpec | None, device: str):
        self.module, self.ids, self.new_tokens, self.kv, self.device = module, ids, new_tokens, kv, device
        self.cuda = device.startswith("cuda")
        self.timing_source = "CUDA events after every step" if self.cuda else "the host clock after every step"
        self.step, self.static, self.compile_s, self._skips = None, None, None, None
        if decode == "compiled":
            self.step = compiled_decode_step(device)
            self.static = new_cache(module, kv, ids.shape[1] + new_tokens)
            self._skips = graph_skips() if self.cuda else None
            t0 = time.perf_counter()
            self._generate()
            self._sync()
            self.compile_s = time.perf_counter() - t0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _generate(self, **kw):
        return generate(self.module, self.ids, self.new_tokens, step=self.step, kv=self.kv, cache=self.static, **kw)

    def run(self) -> Run:
        clock = Clock(self.device)
        tokens, cache = self._generate(clock=clock)
        intervals = clock.intervals_ms()  # waits for the run's last mark
        assert tokens.shape == (self.ids.shape[0], self.new_tokens)
        del tokens, cache  # a run's own KV cache must not outlive it: the next run (and the memory run) would count it
        return Run(intervals, clock.host_intervals_ms())

    def run_untimed(self) -> None:
        tokens, cache = self._generate()
        self._sync()
        del tokens, cache

    def memory_run(self) -> MemoryRun:
        """One generation from an emptied allocator cache, memory read phase by phase. The cache is dropped here (at
        the edge of the GPU's memory it would not fit twice); a compiled cell's static cache, held from its first
        run, is counted as if this run had allocated it (out of `before`), as a new one was."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        phases = memory.PhaseMemory(self.device)
        held = cache_bytes(self.static) if self.static is not None and self.cuda else 0
        phases.before = memory.allocated(self.device) - held
        _, cache = self._generate(phases=phases)
        out = MemoryRun(phases.before, phases.prefill_peak, phases.decode_peak, phases.after_prefill,
                        phases.after_decode, cache_bytes(cache), cache_element_size(cache))
        del cache
        return out

    def prefill_only(self) -> None:
        with torch.no_grad():
            cache = empty_cache(self.module, self.kv, None, self.static)
            prefill(self.module, self.ids, cache,
                    None if self.static is None else torch.arange(self.ids.shape[1], device=self.ids.device))

    def profile(self, top: int = 10) -> list[dict]:
        """One decode step (after a prefill and two unprofiled steps) under torch.profiler: the top kernels by GPU
        time on CUDA, the top operators by CPU time on CPU. In the cell's static cache where it holds 3 tokens past the
        prompt (at the edge of memory two would not fit)."""
        from torch.profiler import ProfilerActivity, profile

        reuse = self.static if self.new_tokens >= 3 else None
        static_len = self.ids.shape[1] + max(self.new_tokens, 4) if self.step else None
        ids = self.ids
        with torch.no_grad():
            cache = empty_cache(self.module, self.kv, static_len, reuse)
            pos = (lambda p: torch.tensor([p], device=ids.device)) if self.step else (lambda p: None)
            decode = self.step or (lambda m, t, c, p: decode_one_token(m, t, c))
            token = prefill(self.module, ids, cache, torch.arange(ids.shape[1], device=ids.device) if self.step
                            else None)
            for i in range(2):
                token = decode(self.module, token, cache, pos(ids.shape[1] + i)).clone()
            self._sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            with profile(activities=activities) as prof:
                decode(self.module, token, cache, pos(ids.shape[1] + 2))
                self._sync()
        events = prof.key_averages()
        if self.cuda:
            rows = [(e.key, e.count, e.self_device_time_total) for e in events if e.self_device_time_total > 0]
        else:
            rows = [(e.key, e.count, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]
        rows.sort(key=lambda r: -r[2])
        return [{"name": name[:200], "calls": int(calls), "time_us": float(us)} for name, calls, us in rows[:top]]

    def counters(self) -> dict:
        return {"cudagraph_skips": graph_skips() - self._skips if self._skips is not None else None}

    def close(self) -> None:
        self.static = None


def logits_through_cache(module, ids, prefill_len: int, kv: KvSpec | None):
    """The next token's logits after `prefill_len` tokens at once, then after each further token, each step reading
    every earlier key and value from the (possibly quantized) cache."""
    with torch.no_grad():
        cache = new_cache(module, kv)
        yield module(input_ids=ids[:, :prefill_len], past_key_values=cache, use_cache=True,
                     logits_to_keep=1).logits[:, -1]
        for t in range(prefill_len, ids.shape[1] - 1):
            yield module(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True,
                         logits_to_keep=1).logits[:, -1]
