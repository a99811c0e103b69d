"""The KV-cache axis: `native` (transformers' DynamicCache in the model's dtype) or a quantized cache
(transformers' QuantizedCache, KIVI-style: keys and values quantized per group of `q_group_size`, the newest
tokens kept in full precision in a residual of at most `residual_length - 1` tokens; every `residual_length` steps
the whole cache is dequantized, concatenated and quantized again; the prompt is quantized at prefill already).

Metadata only at import (no torch), so the planner can validate grids and skip cells without it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt

# name -> (transformers backend, bits); None: the native cache
KV_CACHES: dict[str, tuple[str, int] | None] = {
    "native": None,
    "quanto-int4": ("quanto", 4), "quanto-int2": ("quanto", 2),
    "hqq-int8": ("hqq", 8), "hqq-int4": ("hqq", 4), "hqq-int2": ("hqq", 2),
}
COMPILE_REASON = ("a quantized KV cache is dynamic (dequantized, concatenated and re-quantized as it grows); the "
                  "compiled decode path needs a static cache")


class KvOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    q_group_size: Literal[32, 64, 128] = 64
    residual_length: NonNegativeInt = 128


def parse_options(name: str, raw: dict[str, Any]) -> dict:
    if KV_CACHES[name] is None:
        if raw:
            raise ValueError("native takes no options")
        return {}
    return KvOptions(**raw).model_dump()


def label(name: str, options: dict) -> str:
    defaults = KvOptions().model_dump() if KV_CACHES[name] else {}
    changed = {k: v for k, v in options.items() if defaults.get(k) != v}
    return name + ("(" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + ")" if changed else "")


def decode_reason(kv: dict, decode: str) -> str | None:
    if decode == "compiled" and KV_CACHES[kv["name"]] is not None:
        return f"kv_cache {kv['name']} with decode: compiled: {COMPILE_REASON}"
    return None


def new_cache(model, kv: dict | None = None, static_len: int | None = None):
    """DynamicCache, a StaticCache of `static_len` tokens (compiled decode), or a QuantizedCache."""
    from transformers import DynamicCache, QuantizedCache, StaticCache

    spec = KV_CACHES[kv["name"]] if kv else None
    if spec is not None:
        backend, bits = spec
        o = kv["options"]
        return QuantizedCache(backend=backend, config=model.config, nbits=bits, q_group_size=o["q_group_size"],
                              residual_length=o["residual_length"])
    if static_len:
        return StaticCache(config=model.config, max_cache_len=static_len)
    return DynamicCache(config=model.config)


def stored_bytes(cache) -> int:
    """Bytes the cache holds: full-precision keys/values (the residual, for a quantized cache) plus the quantized
    states (quanto's packed tensor subclass flattened; HQQ's packed tensor plus the scale/zero in its meta)."""
    import torch

    from tasks.models import _meta_tensors, _stored_tensors

    seen: dict[int, int] = {}

    def add(t) -> None:
        for inner in _stored_tensors(t):
            if inner.numel():
                seen.setdefault(inner.data_ptr(), inner.numel() * inner.element_size())

    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                add(t)
            elif isinstance(t, tuple):  # HQQ: (packed tensor, meta)
                add(t[0])
                for m in _meta_tensors(t[1]):
                    add(m)
    return sum(seen.values())


def residual_element_size(cache) -> int | None:
    """Bytes of one element in the cache's full-precision part (the model's activation dtype)."""
    for layer in getattr(cache, "layers", []):
        t = getattr(layer, "keys", None)
        if t is not None and hasattr(t, "element_size"):
            return t.element_size()
    return None


def analytic_bytes(geometry: dict, prompt: int, cached: int, batch: int, kv: dict | None, element: int) -> float:
    """KV bytes after `cached` tokens (the first `prompt` of them at prefill). Native: every element in `element`
    bytes. Quantized: tokens past the residual at `bits` per element plus a scale and a zero point per group in the
    activation dtype (`element` bytes each, as both backends keep them), the residual (decode tokens since the last
    flush) at `element` bytes."""
    per_token = 2 * geometry["layers"] * geometry["kv_heads"] * geometry["head_dim"] * batch
    spec = KV_CACHES[kv["name"]] if kv else None
    if spec is None:
        return per_token * cached * element
    _, bits = spec
    o = kv["options"]
    residual = (cached - prompt) % o["residual_length"] if o["residual_length"] else 0
    quantized = cached - residual
    return per_token * (quantized * (bits / 8 + 2 * element / o["q_group_size"]) + residual * element)
