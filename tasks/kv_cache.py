"""KV-cache accounting: the bytes a cache must hold by its geometry (analytic), against the bytes its own tensors hold
(measured by the engine). Native: every element in the activation dtype. Quantized (transformers' QuantizedCache):
tokens past the residual at `bits` per element plus a scale and a zero point per group in the activation dtype, the
residual (decode tokens since the last flush) at full precision."""
from __future__ import annotations

from common.catalog import KV_CACHES
from common.units import KvSpec


def analytic_bytes(geometry: dict, prompt: int, cached: float, batch: int, kv: KvSpec | None, element: int) -> float:
    """KV bytes after `cached` tokens (the first `prompt` of them at prefill); `element`: bytes of a full-precision
    element."""
    per_token = 2 * geometry["layers"] * geometry["kv_heads"] * geometry["head_dim"] * batch
    spec = KV_CACHES[kv.name] if kv else None
    if spec is None:
        return per_token * cached * element
    _, bits = spec
    o = kv.options
    if not o:  # scaled per tensor (vLLM's fp8): every element at `bits`
        return per_token * cached * bits / 8
    residual = (cached - prompt) % o["residual_length"] if o["residual_length"] else 0
    quantized = cached - residual
    return per_token * (quantized * (bits / 8 + 2 * element / o["q_group_size"]) + residual * element)


def cached_tokens(prompt: int, new_tokens: int, decode: str) -> int:
    """Tokens the cache holds at the end: the last generated token is never fed back; a static cache (compiled
    decode) is allocated for every position up front."""
    return prompt + new_tokens - (0 if decode == "compiled" else 1)


def element_size(geometry: dict, tensor_bytes: int, cached: int, batch: int, residual_element: int | None,
                 kv: KvSpec | None) -> int:
    """Bytes of a full-precision cached element: a quantized cache's residual's, or the native cache's bytes over
    its elements."""
    if kv:
        return residual_element or 2
    return tensor_bytes // max(1, int(analytic_bytes(geometry, 0, cached, batch, None, 1))) or 2


def accounting(geometry: dict, tensor_bytes: int, residual_element: int | None, prompt: int, new_tokens: int,
               batch: int, decode: str, kv: KvSpec | None) -> dict:
    """The KV columns of a cell's row: measured and analytic bytes, per cached token, and the geometry."""
    cached = cached_tokens(prompt, new_tokens, decode)
    element = element_size(geometry, tensor_bytes, cached, batch, residual_element, kv)
    analytic = analytic_bytes(geometry, prompt, cached, batch, kv, element)
    return {
        "kv_cache_bytes": int(analytic),
        "kv_cache_tensor_bytes": tensor_bytes,
        "kv_bytes_per_token": tensor_bytes / (cached * batch),
        "kv_bytes_per_token_analytic": analytic / (cached * batch),
        "kv_layers": geometry["layers"], "kv_heads": geometry["kv_heads"], "head_dim": geometry["head_dim"],
        "kv_bytes_per_element": element,
    }
