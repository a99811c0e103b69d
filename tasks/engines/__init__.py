"""Engines: what loads a model and runs it. The measurements (perplexity, latency, memory) call a loaded model only
through `Model` below; an engine is one module here with `load(...) -> Model` (hf.py: transformers in eager PyTorch).
Adding one (vLLM, say) is a module here and its name in spec.units.ENGINES, which the grid's `engine` field accepts."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

from spec.units import KvSpec, ModelSpec


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

    def window_logits(self, ids) -> Any: ...    # [batch, tokens, vocab] for whole windows, no cache

    def window_hidden(self, ids) -> Any: ...    # [batch, tokens, hidden]: what the output head reads

    def output_head(self) -> tuple[Any, Any]: ...  # (weight [vocab, hidden], bias or None): logits = h W^T + b

    def next_logits(self, ids, cache, positions=None) -> Any: ...  # [batch, vocab]: the next token's, through a cache

    def prefill(self, ids, cache, positions=None) -> Any: ...       # [batch, 1]: the first generated token

    def decode_one_token(self, token, cache, positions=None) -> Any: ...  # [batch, 1]: one more token

    def compiled_decode(self) -> Callable: ...  # decode_one_token compiled (static cache, explicit positions)

    def new_cache(self, kv: KvSpec | None = None, static_len: int | None = None) -> Any: ...

    def reset_cache(self, cache) -> None: ...   # empty it for a new generation, in place (its tensors stay put)

    def cache_bytes(self, cache) -> int: ...    # bytes the cache's tensors hold

    def cache_element_size(self, cache) -> int | None: ...  # bytes of a full-precision cached element

    def weight_stats(self) -> dict: ...         # params, weights_bytes, bits_per_param, embedding_unread_bytes


def own_process(engine: str, libraries: set[str]) -> None:
    """This process runs one unit alone, which imports only `libraries` (quantization libraries, by import name): the
    engine may leave the others unimported (hf.py: transformers imports torchao and hqq whenever installed)."""
    hook = getattr(importlib.import_module(f"tasks.engines.{engine}"), "own_process", None)
    if hook is not None:
        hook(libraries)


def load(engine: str, model: ModelSpec, precision, options, device: str, calibration: dict | None = None) -> Model:
    return importlib.import_module(f"tasks.engines.{engine}").load(model, precision, options, device, calibration)
