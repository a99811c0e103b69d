"""One entry per variant of a model: the main table's figures at the headline cell (chosen among the cells the rows
have), eager and compiled, with their intervals, and every other figure for its detail."""
from __future__ import annotations

import math

import pandas as pd

from common.stats import MIN_SAMPLES, paired_log_ratio
from reports.data import col, first, method_group, precision_order, val
from reports.speed import noisy

BROKEN_RATIO = 10.0   # perplexity more than this times the baseline's: broken, named, kept out of the charts' scales
QUALITY_BUDGET = {"kl": 0.02, "ppl_change_pct": 1.0}  # the grid's report.quality_budget by default


def headline_cell(df: pd.DataFrame) -> dict | None:
    """The cell the main table shows: of the (batch, prompt, new tokens) with an ok row, the one the most variants
    have (eager or compiled, native KV cache), then the smallest batch, the shortest prompt, the longest generation."""
    ok = df[(df.status == "ok") & (df.kv_cache == "native")]
    if ok.empty:
        return None
    counts = ok.groupby(["batch_size", "prompt_tokens", "new_tokens"]).variant.nunique()
    b, p, n = min(counts.index, key=lambda k: (-counts[k], k[0], k[1], -k[2]))
    return {"batch_size": int(b), "prompt_tokens": int(p), "new_tokens": int(n)}


def at(df: pd.DataFrame, cell: dict, decode: str) -> pd.DataFrame:
    return df[(df.batch_size == cell["batch_size"]) & (df.prompt_tokens == cell["prompt_tokens"])
              & (df.new_tokens == cell["new_tokens"]) & (df.decode == decode) & (df.kv_cache == "native")]


def _row(d: pd.DataFrame):
    return d.iloc[0] if len(d) else None


def _get(r, k):
    return val(r.get(k)) if r is not None and k in r else None


def entries(df: pd.DataFrame, baseline: str | None, cell: dict | None,
            budget: dict | None = None) -> list[dict]:
    """One entry per variant: quality (perplexity, its change against the baseline with the paired interval, KL,
    top-1) and its state against the quality budget, sizes, and eager and compiled speed at `cell`."""
    budget = {**QUALITY_BUDGET, **(budget or {})}
    base_rows = df[(df.variant == baseline) & col(df, "ppl_window_nll").notna()]
    base_nll = list(first(base_rows.ppl_window_nll)) if len(base_rows) else None
    base_ppl = first(col(df[df.variant == baseline], "perplexity"))
    out = []
    for p in precision_order(df, baseline):
        d = df[df.variant == p]
        ok = d[d.status == "ok"]
        eager = _row(at(ok, cell, "eager")) if cell else None
        comp = _row(at(ok, cell, "compiled")) if cell else None
        comp_skip = _row(at(d[d.status == "skipped"], cell, "compiled")) if cell else None
        ppl, windows = first(col(d, "perplexity")), first(col(d, "ppl_windows"))
        lo, hi = first(col(d, "ppl_ci_low")), first(col(d, "ppl_ci_high"))
        e = {"precision": p, "engine": first(col(d, "engine")) or "hf", "method": method_group(d),
             "name": first(col(d, "precision")), "description": first(col(d, "precision_description")),
             "library": first(col(d, "quant_library")),
             "status": "ok" if eager is not None or comp is not None else (first(d.status) or "–"),
             "reason": first(col(d[d.status != "ok"], "error_message")),
             "perplexity": ppl, "ppl_windows": windows, "ppl_ci": (lo, hi),
             "kl_mean": first(col(d, "kl_mean")), "kl_p99": first(col(d, "kl_p99")),
             "top1": first(col(d, "top1_agreement")), "distance_missing": first(col(d, "distance_missing")),
             "weights_bytes": first(col(d, "weights_bytes")), "bits_per_param": first(col(d, "bits_per_param")),
             "weight_bits": first(col(d, "weight_bits_nominal")),
             "peak_bytes": _get(eager if eager is not None else comp, "peak_bytes"),
             "rss_bytes": _get(eager if eager is not None else comp, "peak_rss_bytes"),
             "decode_ms": _get(eager, "decode_ms_per_token"),
             "decode_ci": (_get(eager, "decode_ms_ci_low"), _get(eager, "decode_ms_ci_high")),
             "compiled_ms": _get(comp, "decode_ms_per_token"),
             "compiled_ci": (_get(comp, "decode_ms_ci_low"), _get(comp, "decode_ms_ci_high")),
             "compiled_skipped": _get(comp_skip, "error_message"),
             "tokens_per_s": _get(eager if eager is not None else comp, "decode_tokens_per_s"),
             "noisy": eager is not None and noisy(eager), "compiled_noisy": comp is not None and noisy(comp),
             "eager_row": eager, "compiled_row": comp, "detail": _detail(d, eager, comp)}
        e["ppl_change"], e["ppl_change_ci"] = _ppl_change(d, ppl, base_ppl, base_nll, p == baseline)
        e["quality_state"] = quality_state(e, p == baseline, budget)
        e["broken"] = bool(ppl and base_ppl and ppl > BROKEN_RATIO * base_ppl)
        out.append(e)
    return out


def _ppl_change(d, ppl, base_ppl, base_nll, is_base) -> tuple:
    """Δ perplexity in % against the baseline with its paired 95% interval over the same windows (None with fewer
    than MIN_SAMPLES windows)."""
    if is_base or ppl is None or not base_ppl:
        return (0.0 if is_base and ppl else None), None
    lo, hi = first(col(d, "ln_ppl_ratio_ci_low")), first(col(d, "ln_ppl_ratio_ci_high"))
    mine, tokens = first(col(d, "ppl_window_nll")), first(col(d, "ppl_window_tokens"))
    if lo is None and base_nll and mine is not None and tokens is not None:  # recomputed from both rows' windows
        iv = paired_log_ratio(list(mine), base_nll, list(tokens))
        lo, hi = (iv[1], iv[2]) if iv else (None, None)
    change = (ppl / base_ppl - 1) * 100
    if lo is None:
        return change, None
    return change, ((math.exp(lo) - 1) * 100, (math.exp(hi) - 1) * 100)


def quality_state(e: dict, is_base: bool, budget: dict) -> str | None:
    """Against the baseline: "≈ baseline" where the paired interval of Δ perplexity lies within ±the budget (a
    difference that matters is excluded), "not resolved" where it holds 0 but reaches past the budget, "worse" or
    "better" where it excludes 0; "too few windows" with fewer than MIN_SAMPLES; None for the baseline or no quality."""
    if is_base or e["perplexity"] is None:
        return None
    if (e["ppl_windows"] or 0) < MIN_SAMPLES or e["ppl_change_ci"] is None:
        return "too few windows"
    lo, hi = e["ppl_change_ci"]
    if -budget["ppl_change_pct"] <= lo and hi <= budget["ppl_change_pct"]:
        return "≈ baseline"
    if lo <= 0 <= hi:
        return "not resolved"
    return "worse" if lo > 0 else "better"


DETAIL = [("TTFT ms", "ttft_ms", "{:.2f}"), ("decode p99 ms", "decode_ms_p99", "{:.2f}"),
          ("prefill tokens/s", "prefill_tokens_per_s", "{:,.0f}"), ("of bandwidth limit", "bandwidth_fraction", "pct"),
          ("floor ms/token", "decode_ms_floor", "{:.3f}"), ("KV cache MB", "kv_cache_bytes", "mb"),
          ("prefill peak MB", "prefill_peak_bytes", "mb"), ("J / decode token", "energy_j_per_decode_token", "{:.3g}"),
          ("J / prefill token", "energy_j_per_prefill_token", "{:.3g}"), ("mean power W", "power_mean_w", "{:.0f}"),
          ("$ / M tokens", "usd_per_million_tokens", "{:.3f}"), ("repeats", "repeats_done", "{:.0f}"),
          ("CV decode", "cv_decode", "pct"), ("timing", "timing_source", "{}"),
          ("host load (1 min)", "host_load_1m", "{:.1f}"),
          ("CPUs others took (most)", "host_other_busy_cpus_max", "{:.1f}"),
          ("host probe ms (before timed runs)", "host_probe_before_ms", "{:.2f}")]
UNIT = [("what it is", "precision_description", "{}"), ("load s", "load_s", "{:.1f}"),
        ("quantize s", "quantize_s", "{:.1f}"), ("calibration s", "calibration_s", "{:.1f}"),
        ("kernel path", "linear_class", "{}"), ("applied", "quant_config", "{}"),
        ("engine", "engine_version", "vLLM {}"), ("attention", "attention_backend", "{}"),
        ("perplexity windows", "ppl_windows", "{:.0f}"), ("tokens scored", "ppl_tokens_scored", "{:,.0f}"),
        ("windows per pass", "ppl_batch_size", "{:.0f}"), ("KL median", "kl_median", "{:.3g}"),
        ("KL p90", "kl_p90", "{:.3g}"), ("KL p99", "kl_p99", "{:.3g}"), ("KL max", "kl_max", "{:.3g}"),
        ("Δp mean", "delta_p_mean", "{:+.4f}"), ("Δp RMS", "delta_p_rms", "{:.4f}"),
        ("measured under", "measurement_note", "{}")]


def fmt(v, how: str) -> str:
    if v is None:
        return "–"
    if how == "mb":
        return f"{v / 1e6:,.1f}"
    if how == "pct":
        return f"{v:.1%}" if v >= 0.001 else f"{v:.2%}"
    try:
        return how.format(v)
    except (ValueError, TypeError):
        return str(v)


def _detail(d: pd.DataFrame, eager, comp) -> list[tuple[str, str]]:
    out = [(label, fmt(first(col(d, k)), how)) for label, k, how in UNIT]
    for name, row in (("eager", eager), ("compiled", comp)):
        if row is not None:
            out += [(f"{label} ({name})", fmt(_get(row, k), how)) for label, k, how in DETAIL]
    if comp is not None:
        out.append(("compile s", fmt(_get(comp, "compile_s"), "{:.1f}")))
    return [(k, v) for k, v in out if v != "–"]
