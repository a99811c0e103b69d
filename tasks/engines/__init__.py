"""Engines: what loads a model and runs it. The measurements (perplexity, distance, latency, memory, energy) call a
loaded model only through the verbs below, which any inference engine can serve: score whole windows, generate
exactly N tokens for a batch of prompts with the timings it can give, and report memory and weights. An engine is one
module here, `tasks/engines/<name>.py`, with `load(model, precision, options, device, calibration, unit) -> Model`
(`unit`: the common.units.UnitSpec it serves, for engines whose settings follow its cells), plus
its name in common.units.ENGINES; the grid's `engine` field then accepts it. Step-level loops (transformers' prefill and
decode_one_token, its KV caches) stay inside their engine's module.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from common.units import KvSpec, ModelSpec


@dataclass
class Run:
    """One generation of exactly N tokens, as the engine timed it: `intervals_ms` the time to the first token, then
    the gap before each next token (N - 1 of them); `host_ms` the host's gaps where the engine reads them (how long
    issuing each step took), else None."""
    intervals_ms: list[float]
    host_ms: list[float] | None = None


@dataclass
class MemoryRun:
    """One generation with memory read phase by phase (bytes): before it, the peaks of prefill and decode, after
    each; and the KV cache it held (its tensors' bytes, and bytes of a full-precision element)."""
    before: int
    prefill_peak: int | None
    decode_peak: int | None
    after_prefill: int
    after_decode: int
    cache_bytes: int
    cache_element_size: int | None
    facts: dict = field(default_factory=dict)   # engine-specific memory columns (vLLM's KV pool)


class Generation(Protocol):
    """One cell's generation, prepared (compiled, its cache allocated): exactly `new_tokens` tokens, greedy, EOS
    ignored, for a batch of prompts of equal length."""
    compile_s: float | None            # preparing it (compilation), not in any latency
    timing_source: str                 # how `run` times: e.g. "cuda events per step", "engine per-request marks"

    def run(self) -> Run: ...          # timed, device-synchronised

    def run_untimed(self) -> None: ...  # the same generation, for the energy window

    def memory_run(self) -> MemoryRun: ...

    def prefill_only(self) -> None: ...  # the prompt alone, as the cell's runs make it (energy per prompt token)

    def profile(self, top: int = 10) -> list[dict] | None: ...  # one decode step's top kernels, or None

    def counters(self) -> dict: ...    # engine counters over the cell's runs (e.g. cudagraph_skips)

    def close(self) -> None: ...


class Model(Protocol):
    tokenizer: Any | None            # None for synthetic weights (prompts are then seeded random ids)
    device: str
    facts: dict                      # what loading it found out, for the rows (load_s, quant_config, ...)

    @property
    def vocab_size(self) -> int: ...

    @property
    def geometry(self) -> dict[str, int]: ...   # layers, kv_heads, head_dim (the analytic KV-cache size)

    @property
    def max_positions(self) -> int | None: ...

    # score whole windows (perplexity, distance): the logits, and what the distance's reference keeps
    def logits(self, ids) -> Any: ...           # [batch, tokens, vocab] for whole windows, no cache

    def hidden_states(self, ids) -> Any: ...    # [batch, tokens, hidden]: what the output head reads

    def output_head(self) -> tuple[Any, Any]: ...  # (weight [vocab, hidden], bias or None): logits = h W^T + b

    def logits_through_cache(self, ids, prefill: int, kv: KvSpec | None) -> Iterator[Any]: ...
    # the next token's logits [batch, vocab] after `prefill` tokens, then after each further token, every position
    # predicted from the cache (the kv-continuation protocol); engines without a step-level cache raise

    def generation(self, ids, new_tokens: int, decode: str, kv: KvSpec | None) -> Generation: ...

    def weight_stats(self) -> dict: ...         # params, weights_bytes, bits_per_param, embedding_unread_bytes


def own_process(engine: str, libraries: set[str]) -> None:
    """This process runs one unit alone, which imports only `libraries` (quantization libraries, by import name): the
    engine may leave the others unimported (hf.py: transformers imports torchao and hqq whenever installed)."""
    hook = getattr(importlib.import_module(f"tasks.engines.{engine}"), "own_process", None)
    if hook is not None:
        hook(libraries)


def load(engine: str, model: ModelSpec, precision, options, device: str, calibration: dict | None = None,
         unit=None) -> Model:
    return importlib.import_module(f"tasks.engines.{engine}").load(model, precision, options, device, calibration,
                                                                   unit)
