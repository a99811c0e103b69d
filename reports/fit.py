"""What fits a GPU: a model of peak memory from what a sweep measured, and the largest batch at each context length
that fits a memory budget.

    peak(batch, context) = weights + workspace + batch × context × (kv_per_token + activation_per_token)

- weights: GPU memory allocated once the model is loaded (weights_allocated_bytes);
- kv_per_token: the KV cache's bytes per cached token of one sequence, measured from the cache's own tensors
  (kv_bytes_per_token: a quantized cache's scales and residual included);
- workspace and activation_per_token: a line through what each measured cell held beyond its weights and its KV
  cache (peak held − weights − the KV cache at its end) against the tokens it held (batch × context): the
  least-squares slope, and the intercept raised until no measured cell lies above the line. The
  workspace is what a run needs whatever its size (a layer's dequantized weights, kernels' scratch); the slope is
  the prefill's activations per token. (A model of activations per token alone, fitted to the largest ratio, read a
  4-bit layer's dequantized weights at a 160-token cell as 2 MB per token and under-predicted what fits by 2-3x.)
"Held" is what PyTorch's caching allocator reserved from the GPU (peak_reserved_bytes), not what tensors allocated
(peak_bytes): the difference is fragmentation, and it is what runs out. On an H200 the 7B in fp16 at 4064 + 32
tokens x 32 sequences allocated 88 GiB and reserved 137 GiB; a model of allocated bytes predicted 53 sequences fit the
card's 139.8 GiB, and batch 53 ran out of memory with 29 GiB reserved but unallocated (bench/fit_edge.py,
docs/results/h200-2026-11-30c). Fragmentation is the default allocator's: with PYTORCH_CUDA_ALLOC_CONF=
expandable_segments:True (rows record it, cuda_alloc_conf) it reserved within 1.5% of what it allocated, and fp16's
batch 53 ran (docs/results/h200-2026-11-30d); the model, fitted to the rows it is given, follows the setting they ran
with. Where no reserved figure was measured (CPU), the allocated peak stands in.
A budget is a GPU's memory less a reserve for the CUDA context and the allocator's slack (RESERVE: 1 GiB). The model
is checked against every measured cell (predicted against measured peak) and on a GPU by running the predicted
largest batch and one beyond it (bench/fit_edge.py).
"""
from __future__ import annotations

import math

import pandas as pd

from reports.data import col, val

GiB = 1 << 30
RESERVE = 1 * GiB


def fitted_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows a memory model is made from: eager decode, native KV cache (a compiled static cache and a quantized
    cache hold memory their own way)."""
    return df[(df.get("decode", "eager") == "eager") & (df.get("kv_cache", "native") == "native")]


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
    extra = (held(ok) - weights - col(ok, "kv_cache_bytes").fillna(0)).clip(lower=0)  # what else was held
    workspace, slope = upper_line(tokens, extra.astype(float).to_numpy())
    return {"weights": float(weights), "kv_per_token": float(kv), "workspace": workspace,
            "activation_per_token": slope, "cells": len(ok)}


def held(cells: pd.DataFrame) -> pd.Series:
    """What each cell held on the GPU: the allocator's reserved peak, or the allocated one where that is missing."""
    return pd.concat([cells.peak_bytes.astype(float), col(cells, "peak_reserved_bytes").astype(float)],
                     axis=1).max(axis=1)


def upper_line(x, y) -> tuple[float, float]:
    """(intercept, slope) ≥ 0 of a line no point lies above: the least-squares slope (through the origin when all
    points share one x), the intercept raised to the highest residual."""
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(set(x)) < 2:
        return 0.0, float(max(y / x)) if len(x) else 0.0
    slope = max(0.0, float(np.polyfit(x, y, 1)[0]))
    return max(0.0, float(max(y - slope * x))), slope


def peak(p: dict, batch: int, context: int) -> float:
    return p["weights"] + p.get("workspace", 0.0) + batch * context * (p["kv_per_token"] + p["activation_per_token"])


def largest_batch(p: dict, context: int, budget: float, reserve: float = RESERVE) -> int:
    """The largest batch whose predicted peak fits `budget` less `reserve` at `context` tokens (0: not even one)."""
    room = budget - reserve - peak(p, 0, context)  # what a batch has once the weights and workspace are held
    per = context * (p["kv_per_token"] + p["activation_per_token"])
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
