"""What fits a GPU: a model of peak memory from what a sweep measured, and the largest batch at each context length
that fits a memory budget.

    peak(batch, context) = weights + batch × context × (kv_per_token + activation_per_token)

- weights: GPU memory allocated once the model is loaded (weights_allocated_bytes);
- kv_per_token: the KV cache's bytes per cached token of one sequence, measured from the cache's own tensors
  (kv_bytes_per_token: a quantized cache's scales and residual included);
- activation_per_token: the largest, over the measured cells, of (peak allocated − allocated before the run − the
  KV cache at its end) per token of the batch's context: the prefill's activations and the kernels' workspace.
A budget is a GPU's memory less a reserve for the CUDA context and the allocator's slack (RESERVE: 1 GiB). The model
is checked against every measured cell (predicted against measured peak) and on a GPU by running the predicted
largest batch and one beyond it.
"""
from __future__ import annotations

import math

import pandas as pd

from reports.data import col, val

GiB = 1 << 30
RESERVE = 1 * GiB


def parameters(cells: pd.DataFrame) -> dict | None:
    """The memory model's parameters from one (model, precision, KV cache, decode path)'s ok GPU cells."""
    ok = cells[(cells.status == "ok") & col(cells, "peak_bytes").notna() & col(cells, "memory_before_bytes").notna()]
    if ok.empty:
        return None
    weights = val(col(ok, "weights_allocated_bytes").dropna().max()) or val(col(ok, "weights_bytes").dropna().max())
    kv = val(col(ok, "kv_bytes_per_token").dropna().median())
    if weights is None or kv is None:
        return None
    context = ok.batch_size * (ok.prompt_tokens + ok.new_tokens)
    act = ((ok.peak_bytes - ok.memory_before_bytes - col(ok, "kv_cache_bytes").fillna(0)) / context).clip(lower=0)
    return {"weights": float(weights), "kv_per_token": float(kv), "activation_per_token": float(act.max()),
            "cells": len(ok)}


def peak(p: dict, batch: int, context: int) -> float:
    return p["weights"] + batch * context * (p["kv_per_token"] + p["activation_per_token"])


def largest_batch(p: dict, context: int, budget: float, reserve: float = RESERVE) -> int:
    """The largest batch whose predicted peak fits `budget` less `reserve` at `context` tokens (0: not even one)."""
    room = budget - reserve - p["weights"]
    per = context * (p["kv_per_token"] + p["activation_per_token"])
    return max(0, math.floor(room / per)) if per > 0 and room > 0 else 0


def check(p: dict, cells: pd.DataFrame) -> float | None:
    """The model's largest relative error against the cells it was made from (predicted peak vs measured)."""
    ok = cells[(cells.status == "ok") & col(cells, "peak_bytes").notna()]
    errors = [abs(peak(p, int(r.batch_size), int(r.prompt_tokens + r.new_tokens)) / r.peak_bytes - 1)
              for r in ok.itertuples() if r.peak_bytes]
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
