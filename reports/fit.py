"""What fits a GPU: a model of peak memory from what a sweep measured, and the largest batch at each context length
that fits a memory budget.

    peak(batch, context) = weights + workspace + batch × (KV bytes of a sequence of `context` tokens
                                                          + context × activation_per_token)

- weights: GPU memory allocated once the model is loaded (weights_allocated_bytes);
- a sequence's KV bytes: context × the cache's bytes per cached token, measured from the cache's own tensors
  (kv_bytes_per_token: a quantized cache's scales and residual included); under vLLM, whole blocks of its paged
  cache: ceil(context / kv_block_tokens) × kv_block_bytes, read off vLLM's own block layout;
- workspace and activation_per_token: a line through what each measured cell held beyond its weights and its KV
  cache against the tokens it held (batch × context): the least-squares slope, and the intercept raised until no
  measured cell lies above the line (the workspace is what a run needs whatever its size: a layer's dequantized
  weights, kernels' scratch; the slope is the prefill's activations per token).
"Held" is what PyTorch's caching allocator reserved from the GPU (peak_reserved_bytes), not what tensors allocated
(peak_bytes): the difference is fragmentation, and it is what runs out; rows record the allocator's setting
(cuda_alloc_conf; `expandable_segments:True` reserves within a few percent of what it allocates), and the model
follows the rows it is given. Where no reserved figure was measured (CPU), or the engine reserved its KV pool whole
up front (vLLM), the allocated peak stands in.
A budget is a GPU's memory less a reserve for the CUDA context and the allocator's slack (RESERVE: 1 GiB). The model
is checked against every measured cell (predicted against measured peak).
"""
from __future__ import annotations

import math

import pandas as pd

from reports.data import col, val

GiB = 1 << 30
RESERVE = 1 * GiB


def fitted_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows a memory model is made from: native KV cache; under transformers eager decode (a compiled static cache
    holds memory its own way), under vLLM its default (compiled)."""
    engine = col(df, "engine").fillna("hf")
    decode = col(df, "decode").fillna("eager")
    return df[(col(df, "kv_cache").fillna("native") == "native")
              & (((engine == "hf") & (decode == "eager")) | ((engine != "hf") & (decode == "compiled")))]


def fits(df: pd.DataFrame, variants: list[str], budgets: list[tuple[str, float]]) -> list[dict]:
    """Per budget and context length (the longest three the sweep measured), the largest batch of each variant by
    the memory model, beside the largest batch it measured."""
    d = fitted_rows(df)
    params = {v: parameters(d[d.variant == v]) for v in variants}
    params = {v: p for v, p in params.items() if p}
    if not params:
        return []
    ok = d[d.status == "ok"]
    contexts = sorted({int(x) for x in (ok.prompt_tokens + ok.new_tokens).dropna()})[-3:]
    measured = int(ok.batch_size.max())
    new_tokens = int(ok.new_tokens.max())
    return [{"label": label, "bytes": size, "context": context, "measured_batch": measured, "new_tokens": new_tokens,
             "batches": {v: largest_batch(p, context, size) for v, p in params.items()}}
            for label, size in budgets for context in contexts]


def errors(df: pd.DataFrame, variants: list[str]) -> dict[str, float]:
    """Each variant's model's largest relative error against its measured cells."""
    d = fitted_rows(df)
    out = {}
    for v in variants:
        cells = d[d.variant == v]
        p = parameters(cells)
        err = check(p, cells) if p else None
        if err is not None:
            out[v] = err
    return out


def parameters(cells: pd.DataFrame) -> dict | None:
    """The memory model's parameters from one (model, precision, KV cache, decode path)'s ok GPU cells."""
    ok = cells[(cells.status == "ok") & col(cells, "peak_bytes").notna() & col(cells, "memory_before_bytes").notna()]
    if ok.empty:
        return None
    weights = val(col(ok, "weights_allocated_bytes").dropna().max()) or val(col(ok, "weights_bytes").dropna().max())
    kv = val(col(ok, "kv_bytes_per_token").dropna().median())
    if weights is None or kv is None:
        return None
    tokens = (ok.batch_size * (ok.prompt_tokens + ok.new_tokens)).astype(float).to_numpy()
    kv_held = col(ok, "kv_cache_tensor_bytes").fillna(col(ok, "kv_cache_bytes")).fillna(0)
    extra = (held(ok) - weights - kv_held).clip(lower=0)  # what else was held
    workspace, slope = upper_line(tokens, extra.astype(float).to_numpy())
    out = {"weights": float(weights), "kv_per_token": float(kv), "workspace": workspace,
           "activation_per_token": slope, "cells": len(ok)}
    block_tokens, block_bytes = val(col(ok, "kv_block_tokens").max()), val(col(ok, "kv_block_bytes").max())
    if block_tokens and block_bytes:
        out.update(block_tokens=int(block_tokens), block_bytes=float(block_bytes))
    return out


def held(cells: pd.DataFrame) -> pd.Series:
    """What each cell held on the GPU: the allocator's reserved peak, or the allocated one where that is missing or
    where the engine reserved its KV pool whole (vLLM)."""
    reserved = pd.to_numeric(col(cells, "peak_reserved_bytes"), errors="coerce").astype(float)
    reserved = reserved.where(col(cells, "engine").fillna("hf") == "hf")
    return pd.concat([cells.peak_bytes.astype(float), reserved], axis=1).max(axis=1)


def upper_line(x, y) -> tuple[float, float]:
    """(intercept, slope) ≥ 0 of a line no point lies above: the least-squares slope (through the origin when all
    points share one x), the intercept raised to the highest residual."""
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(set(x)) < 2:
        return 0.0, float(max(y / x)) if len(x) else 0.0
    slope = max(0.0, float(np.polyfit(x, y, 1)[0]))
    return max(0.0, float(max(y - slope * x))), slope


def sequence_bytes(p: dict, context: int) -> float:
    """What one sequence of `context` tokens holds: its KV cache (whole blocks where the engine pages it) and its
    activations."""
    kv = (math.ceil(context / p["block_tokens"]) * p["block_bytes"] if p.get("block_tokens") else
          context * p["kv_per_token"])
    return kv + context * p["activation_per_token"]


def peak(p: dict, batch: int, context: int) -> float:
    return p["weights"] + p.get("workspace", 0.0) + batch * sequence_bytes(p, context)


def largest_batch(p: dict, context: int, budget: float, reserve: float = RESERVE) -> int:
    """The largest batch whose predicted peak fits `budget` less `reserve` at `context` tokens (0: not even one)."""
    room = budget - reserve - peak(p, 0, context)  # what a batch has once the weights and workspace are held
    per = sequence_bytes(p, context)
    return max(0, math.floor(room / per)) if per > 0 and room > 0 else 0


def check(p: dict, cells: pd.DataFrame) -> float | None:
    """The model's largest relative error against the cells it was made from (predicted peak vs what each held)."""
    ok = cells[(cells.status == "ok") & col(cells, "peak_bytes").notna()]
    errors = [abs(peak(p, int(r.batch_size), int(r.prompt_tokens + r.new_tokens)) / h - 1)
              for r, h in zip(ok.itertuples(), held(ok)) if h]
    return max(errors) if errors else None


def parse_size(text) -> float:
    """Bytes from 16GiB, 24GB, 80 GiB or a number."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().upper().replace(" ", "")
    for unit, mult in (("GIB", GiB), ("GB", 1e9), ("MIB", 1 << 20), ("MB", 1e6)):
        if s.endswith(unit):
            return float(s[:-len(unit)]) * mult
    return float(s)


def budget_label(b: float) -> str:
    return f"{b / GiB:g} GiB" if abs(b / GiB - round(b / GiB)) < 0.05 else f"{b / 1e9:.0f} GB"
