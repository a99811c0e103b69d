"""The report's tables and findings, computed from result rows (a pandas DataFrame)."""
from __future__ import annotations

import json

import pandas as pd

from reports.data import FAILED, col, first, headline_cell, precision_order  # noqa: F401 (first used by build)


def _f(x):
    return None if x is None or (isinstance(x, float) and x != x) else x


def header(df: pd.DataFrame, sweeps: list[str]) -> dict:
    started = pd.to_datetime(col(df, "started_at"), utc=True).dropna()
    ended = pd.to_datetime(col(df, "ended_at"), utc=True).dropna()
    gpus = df.dropna(subset=["gpu_uuid"]) if "gpu_uuid" in df else df.iloc[0:0]
    gpu_names = sorted(set(gpus.gpu_name)) if len(gpus) else []
    return {
        "sweeps": sweeps,
        "date": ended.max().strftime("%Y-%m-%d %H:%M UTC") if len(ended) else "–",
        "hosts": sorted(set(col(df, "host").dropna())),
        "gpus": int(gpus.gpu_uuid.nunique()) if len(gpus) else 0,
        "gpu_names": gpu_names,
        "device": "GPU" if len(gpus) else "CPU",
        "wall_s": (ended.max() - started.min()).total_seconds() if len(started) and len(ended) else None,
        "ok": int((df.status == "ok").sum()),
        "failed": int(df.status.isin(FAILED).sum()),
        "skipped": int((df.status == "skipped").sum()),
        "cells": len(df),
    }


def model_table(df: pd.DataFrame, baseline: str | None) -> tuple[list[dict], tuple[int, int] | None]:
    """One row per precision at the headline cell, with changes against the baseline."""
    cell = headline_cell(df)
    rows = []
    base = {}
    order = precision_order(df, baseline)
    order = order[:1] + sorted(order[1:], key=lambda p: method_rank(df[df.precision == p]))
    for p in order:
        d = df[df.precision == p]
        at = d[(d.new_tokens == cell[0]) & (d.batch_size == cell[1]) & (d.status == "ok")] if cell else d.iloc[0:0]
        r = at.iloc[0] if len(at) else None
        get = (lambda k: _f(r.get(k)) if r is not None and k in r else None)
        row = {
            "precision": p,
            "status": "ok" if r is not None else (first(d.status) or "–"),
            "perplexity": _f(first(col(d, "perplexity"))),
            "weights_bytes": _f(first(col(d, "weights_bytes"))),
            "bits_per_param": _f(first(col(d, "bits_per_param"))),
            "weights_allocated_bytes": _f(first(col(d, "weights_allocated_bytes"))),
            "prefill_peak_bytes": get("prefill_peak_bytes"),
            "decode_peak_bytes": get("decode_peak_bytes"),
            "kv_cache_bytes": get("kv_cache_bytes"),
            "ttft_ms": get("ttft_ms"),
            "decode_ms_per_token": get("decode_ms_per_token"),
            "decode_tokens_per_s": get("decode_tokens_per_s"),
            "bandwidth_fraction": get("bandwidth_fraction"),
            "decode_ms_floor": get("decode_ms_floor"),
            "load_s": _f(first(col(d, "load_s"))),
            "quantize_s": _f(first(col(d, "quantize_s"))),
            "calibration_s": _f(first(col(d, "calibration_s"))),
            "calibration_cached": bool(first(col(d, "calibration_cached"))),
            "calib": _calib_text(d),
            "method": method_group(d),
            "library": first(col(d, "quant_library")),
            "noisy": bool(r.get("noisy_timing")) if r is not None and "noisy_timing" in r else False,
        }
        if p == baseline:
            base = row
        rows.append(row)
    for row in rows:
        row["ppl_change"] = _ratio(row["perplexity"], base.get("perplexity"), pct=True)
        row["weights_smaller"] = _ratio(base.get("weights_bytes"), row["weights_bytes"])
        row["decode_vs_base"] = _ratio(row["decode_ms_per_token"], base.get("decode_ms_per_token"))
    return rows, cell


SCHEMES = {"none": 0, "weight-only": 1, "weight+activation": 2}


# rows written before quant_scheme and weight_bits_nominal existed (bitsandbytes and unquantized only)
LEGACY = {"fp32": ("none", 32), "fp16": ("none", 16), "bf16": ("none", 16), "int8": ("weight-only", 8),
          "nf4": ("weight-only", 4), "fp4": ("weight-only", 4), "nf4-dq": ("weight-only", 4)}


def _method(d: pd.DataFrame) -> tuple:
    scheme, bits = first(col(d, "quant_scheme")), first(col(d, "weight_bits_nominal"))
    if scheme is None:
        scheme, bits = LEGACY.get(first(col(d, "precision_name")), (None, None))
    return scheme, bits


def method_group(d: pd.DataFrame) -> str:
    """How a precision quantizes, in the report's groups: unquantized, weight-only N-bit, weight+activation N-bit."""
    scheme, bits = _method(d)
    if scheme in (None, "none") or bits is None or pd.isna(bits):
        return "unquantized" if scheme == "none" else "–"
    return f"{scheme} {bits:g}-bit"


def method_rank(d: pd.DataFrame) -> tuple:
    scheme, bits = _method(d)
    return (SCHEMES.get(scheme, 3), -(bits if bits is not None and not pd.isna(bits) else 0))


def _calib_text(d: pd.DataFrame) -> str | None:
    n, length = first(col(d, "calib_samples")), first(col(d, "calib_seqlen"))
    if n is None or pd.isna(n):
        return None
    text = str(first(col(d, "calib_text")) or "–").rsplit("/", 1)[-1]
    return f"{int(n)} × {int(length)} tokens of {text}"


def kv_cache_table(df: pd.DataFrame, baseline: str | None) -> list[dict]:
    """The KV-cache axis: per precision, cell and cache, KV bytes per token (measured from the cache's tensors and
    analytic), the peak, decode speed, and perplexity through the cache (kv-continuation) against the native cache."""
    if "kv_cache" not in df or not (df.kv_cache.fillna("native") != "native").any():
        return []
    d = df.assign(kv_cache=df.kv_cache.fillna("native"), decode=col(df, "decode").fillna("eager"))
    out = []
    for p in precision_order(d, baseline):
        dp = d[d.precision == p]
        native_ppl = _f(first(col(dp[dp.kv_cache == "native"], "ppl_kv")))
        for (n, b, kv), g in dp.groupby(["new_tokens", "batch_size", "kv_cache"], sort=False):
            r = g.iloc[0]
            get = (lambda k: _f(r.get(k)) if k in r else None)
            ppl = get("ppl_kv")
            out.append({"precision": p, "new_tokens": int(n), "batch_size": int(b), "kv_cache": kv,
                        "status": r.status, "reason": get("error_message"),
                        "kv_bytes_per_token": get("kv_bytes_per_token"),
                        "kv_bytes_per_token_analytic": get("kv_bytes_per_token_analytic"),
                        "kv_cache_tensor_bytes": get("kv_cache_tensor_bytes"), "peak_bytes": get("peak_bytes"),
                        "decode_ms_per_token": get("decode_ms_per_token"), "ppl_kv": ppl,
                        "ppl_kv_change": _ratio(ppl, native_ppl, pct=True) if kv != "native" else None,
                        "ppl_kv_error": get("ppl_kv_error") or get("ppl_kv_skipped_reason")})
    out.sort(key=lambda r: (r["precision"] != baseline, r["precision"], r["new_tokens"], r["batch_size"],
                            r["kv_cache"] != "native", r["kv_cache"]))
    return out


def _ratio(a, b, pct: bool = False):
    if a is None or b is None or not b:
        return None
    return (a / b - 1) * 100 if pct else a / b


def breakdown(df: pd.DataFrame, baseline: str | None) -> list[dict]:
    """Every (precision, new_tokens, batch) cell of one model."""
    order = {p: i for i, p in enumerate(precision_order(df, baseline))}
    d = df.assign(_o=df.precision.map(order), decode=col(df, "decode").fillna("eager"),
                  kv_cache=col(df, "kv_cache").fillna("native"))
    d = d.sort_values(["_o", "decode", "kv_cache", "new_tokens", "batch_size"])
    keys = ["precision", "decode", "kv_cache", "new_tokens", "batch_size", "status", "ttft_ms", "decode_ms_per_token", "decode_ms_p99",
            "decode_tokens_per_s", "peak_bytes", "kv_cache_bytes", "bandwidth_fraction", "noisy_timing", "cv_decode"]
    return [{k: _f(r.get(k)) if k in r else None for k in keys} for _, r in d.iterrows()]


def eager_vs_compiled(df: pd.DataFrame, baseline: str | None) -> list[dict]:
    """Per precision and cell, eager against compiled ms/token next to the bandwidth floor: whether a method is slow
    because of its kernels or because of launching them one by one."""
    if "decode" not in df or not (df.decode == "compiled").any():
        return []
    ok = df[(df.status == "ok") & (col(df, "kv_cache").fillna("native") == "native")]
    out = []
    for p in precision_order(df, baseline):
        for (n, b), g in ok[ok.precision == p].groupby(["new_tokens", "batch_size"]):
            e, c = g[g.decode.fillna("eager") == "eager"], g[g.decode == "compiled"]
            eager = _f(first(col(e, "decode_ms_per_token")))
            comp = _f(first(col(c, "decode_ms_per_token")))
            out.append({"precision": p, "new_tokens": int(n), "batch_size": int(b), "eager_ms": eager,
                        "compiled_ms": comp, "floor_ms": _f(first(col(g, "decode_ms_floor"))),
                        "speedup": _ratio(eager, comp), "compile_s": _f(first(col(c, "compile_s")))})
    skipped = df[(df.decode == "compiled") & (df.status == "skipped")]
    for p in dict.fromkeys(skipped.precision):
        out.append({"precision": p, "skipped": first(skipped[skipped.precision == p].error_message)})
    return out


def top_kernels(df: pd.DataFrame, baseline: str | None, cell: tuple[int, int] | None, n: int = 5) -> list[dict]:
    """With generation.profile: per precision (and decode path), the top kernels of one decode step at the headline
    cell."""
    if "top_kernels" not in df or cell is None:
        return []
    out = []
    at = df[(df.new_tokens == cell[0]) & (df.batch_size == cell[1]) & df.top_kernels.notna()]
    for p in precision_order(df, baseline):
        for _, r in at[at.precision == p].iterrows():
            ks = list(r.top_kernels)[:n]
            if ks:
                out.append({"precision": p, "decode": r.get("decode") or "eager",
                            "kernels": [f"{k['name']} ×{k['calls']}: {k['time_us']:.0f} µs" for k in ks]})
    return out


def findings(df: pd.DataFrame, model: str, baseline: str | None) -> list[str]:
    """Sentences written from the data: speed, weights and perplexity against the baseline, and what dominates
    peak memory."""
    rows, cell = model_table(df, baseline)
    base = next((r for r in rows if r["precision"] == baseline), None)
    out = []
    if cell is None:
        return [f"{model}: no cell finished."]
    n, b = cell
    for r in rows:
        if r is base or r["status"] != "ok":
            continue
        parts = []
        if base and r["decode_vs_base"]:
            x = r["decode_vs_base"]
            if abs(x - 1) < 0.05:
                parts.append(f"{r['precision']} decodes as fast as {baseline} (within 5%) at batch {b}")
            else:
                parts.append(f"{r['precision']} is {max(x, 1 / x):.1f}× {'slower' if x > 1 else 'faster'} than "
                             f"{baseline} at batch {b}")
            parts[-1] += f" on {model} ({n} new tokens)"
        if r["weights_smaller"]:
            w = r["weights_smaller"]
            parts.append(f"weights {w:.1f}× {'smaller' if w >= 1 else 'larger'}")
        if r["ppl_change"] is not None:
            parts.append(f"perplexity {r['ppl_change']:+.1f}%")
        if parts:
            out.append(", ".join(parts) + ".")
    for r in rows:
        if r["status"] != "ok" or not r["decode_peak_bytes"] or not r["weights_bytes"]:
            continue
        peak = max(r["decode_peak_bytes"], r["prefill_peak_bytes"] or 0)
        share = r["weights_bytes"] / peak
        kv = (r["kv_cache_bytes"] or 0) / peak
        if share < 0.5:
            out.append(f"{r['precision']}: weights are only {share:.0%} of the {peak / 1e6:.0f} MB peak "
                       f"(KV cache {kv:.0%}, the rest activations and workspace), so shrinking weights moves the "
                       f"peak little at {n} tokens × batch {b}.")
    slow = [r for r in rows if r["status"] == "ok" and r["bandwidth_fraction"] is not None]
    if slow:
        best = max(slow, key=lambda r: r["bandwidth_fraction"])
        floor = f" against a floor of {best['decode_ms_floor']:.3f} ms" if best["decode_ms_floor"] else ""
        out.append(f"Closest to the memory-bandwidth limit: {best['precision']} at {percent(best['bandwidth_fraction'])} "
                   f"of peak ({best['decode_ms_per_token']:.2f} ms/token{floor}).")
    return out


def percent(x: float) -> str:
    """A fraction as a percentage, with decimals where it would otherwise read 0%."""
    return f"{x:.0%}" if x >= 0.095 else f"{x:.1%}" if x >= 0.00095 else f"{x:.2%}"


def failures(df: pd.DataFrame) -> list[dict]:
    d = df[df.status != "ok"]
    return [{k: _f(r.get(k)) for k in ("model", "precision", "new_tokens", "batch_size", "status", "error_type",
                                        "error_message")} for _, r in d.iterrows()]


def caveats(df: pd.DataFrame) -> list[str]:
    out = []
    for model, note in df.groupby("model")["weights_note"].first().dropna().items() if "weights_note" in df else []:
        out.append(f"{model}: {note}.")
    noisy = df[col(df, "noisy_timing").fillna(False).astype(bool)]
    if len(noisy):
        out.append(f"{len(noisy)} cell(s) have noisy timing (coefficient of variation over 5% across repeats): "
                   + "; ".join(f"{r.model} × {r.precision} n={r.new_tokens} b={r.batch_size}"
                               for r in noisy.head(12).itertuples()) + ("; …" if len(noisy) > 12 else ""))
    shared = df[col(df, "gpu_other_processes").fillna(0) > 0]
    if len(shared):
        pids = sorted({p for x in col(shared, "gpu_other_pids").dropna() for p in str(x).split(",")})
        out.append(f"{len(shared)} cell(s) shared their GPU with other processes (pids {', '.join(pids[:8])}"
                   f"{', …' if len(pids) > 8 else ''}; up to {col(shared, 'gpu_other_process_bytes').max() / 1e6:,.0f} "
                   f"MB): their timings and memory may be off: "
                   + "; ".join(f"{r.model} × {r.precision} n={r.new_tokens} b={r.batch_size}"
                               for r in shared.head(6).itertuples()) + ("; …" if len(shared) > 6 else ""))
    if "device" in df and (df.device == "cpu").any():
        out.append("Some cells ran on CPU: no per-phase GPU peaks; bandwidth limit is a measured CPU copy.")
    return out


def protocol(df: pd.DataFrame) -> dict:
    keys = ["ppl_protocol", "ppl_seqlen", "ppl_stride", "ppl_max_windows", "ppl_batch_size", "ppl_windows",
            "ppl_tokens_scored", "ppl_dataset", "ppl_dataset_sha256"]
    env = ["gpu_name", "driver_version", "cuda_version", "torch_version", "transformers_version",
           "bitsandbytes_version", "accelerate_version", "python_version", "cpu_model", "host", "prompt_tokens",
           "warmup", "repeats", "measurement_version", "peak_bandwidth_gbs", "peak_bandwidth_source"]
    def shown(v):
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)

    summarise = (lambda k: ", ".join(shown(v) for v in sorted(set(col(df, k).dropna()), key=str)) or "–")
    options = sorted(set(zip(col(df, "precision"), col(df, "precision_options"))), key=str)
    return {"perplexity": {k: summarise(k) for k in keys}, "environment": {k: summarise(k) for k in env},
            "precision_options": [(p, json.loads(o) if isinstance(o, str) else o) for p, o in options if p]}
