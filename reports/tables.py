"""What the report says, computed from result rows (a pandas DataFrame): per model the decision (the frontier, what
fits each memory budget, what is broken), the per-precision summary with intervals, ranked findings, the crossover of
quantized speed against the baseline's, the fit table; and the failures, caveats, protocol and environment."""
from __future__ import annotations

import json
import math

import pandas as pd

from reports import fit
from reports.data import (BROKEN_RATIO, FAILED, MAX_DECODE_BOUND, MIN_DECODE_SHARE, at, col, decode_runs, first,
                          frontier, headline_cell, method_group, numeric, per_run_decode, precision_order, val)
from spec.catalog import ENERGY_WINDOW_S, ONE_STATIC_CACHE, measurement_version
from spec.stats import mean_interval, paired_log_ratio, t975

NOISY_HALFWIDTH = 0.05  # a speed whose 95% interval is wider than ±5% of it makes no claim
EXTRAPOLATED = 4  # a predicted largest batch over 4× the largest measured batch is said to be extrapolated


def _ratio_interval(a: list[float], b: list[float]) -> tuple[float, float, float] | None:
    """mean(a) / mean(b) with a 95% interval (independent runs; the delta method on the log ratio)."""
    if len(a) < 2 or len(b) < 2:
        return None
    ia, ib = mean_interval(a), mean_interval(b)
    ma, mb = ia[0], ib[0]
    if ma <= 0 or mb <= 0:
        return None
    sa, sb = (ia[2] - ma) / t975(len(a) - 1), (ib[2] - mb) / t975(len(b) - 1)  # standard errors
    se = math.sqrt((sa / ma) ** 2 + (sb / mb) ** 2)
    r, t = ma / mb, t975(min(len(a), len(b)) - 1)
    return r, r * math.exp(-t * se), r * math.exp(t * se)


def _noisy(row) -> bool:
    """Decode timing too uncertain for a speed claim: its 95% interval wider than ±5%, or (rows without an
    interval) its runs' coefficient of variation over 5%."""
    if row is None:
        return True
    half, cv = val(row.get("decode_ci_rel_halfwidth")), val(row.get("cv_decode"))
    return (half is not None and half > NOISY_HALFWIDTH) or (cv is not None and cv > 0.05)


def machine(r) -> str | None:
    """Where a cell's timing was taken: its GPU (uuid), or its host on CPU. Speeds compare only on one machine:
    hosts of the same GPU type decoded the same model 17.6 and 25.4 ms/token apart (docs/results/h200-2026-11-30c)."""
    if r is None:
        return None
    return _get(r, "gpu_uuid") or _get(r, "host")


def _row(d: pd.DataFrame):
    return d.iloc[0] if len(d) else None


def _get(r, k):
    return val(r.get(k)) if r is not None and k in r else None


def summary(df: pd.DataFrame, baseline: str | None, cell: dict | None) -> list[dict]:
    """One entry per precision: the main table's figures (at the headline cell, eager and compiled) with intervals,
    and the rest for its detail."""
    base_rows = df[(df.precision == baseline) & col(df, "ppl_window_nll").notna()]
    base_nll = list(first(base_rows.ppl_window_nll)) if len(base_rows) else None
    base_ppl = first(col(df[df.precision == baseline], "perplexity"))
    out = []
    for p in precision_order(df, baseline):
        d = df[df.precision == p]
        eager = _row(at(d[d.status == "ok"], cell, "eager")) if cell else None
        comp = _row(at(d[d.status == "ok"], cell, "compiled")) if cell else None
        comp_skip = _row(at(d[d.status == "skipped"], cell, "compiled")) if cell else None
        ppl = first(col(d, "perplexity"))
        e = {"precision": p, "method": method_group(d), "library": first(col(d, "quant_library")),
             "status": "ok" if eager is not None else (first(d.status) or "–"),
             "reason": first(col(d[d.status != "ok"], "error_message")),
             "perplexity": ppl, "ppl_ci": (first(col(d, "ppl_ci_low")), first(col(d, "ppl_ci_high"))),
             "kl_mean": first(col(d, "kl_mean")), "kl_p99": first(col(d, "kl_p99")),
             "top1": first(col(d, "top1_agreement")), "distance_missing": first(col(d, "distance_missing")),
             "weights_bytes": first(col(d, "weights_bytes")), "bits_per_param": first(col(d, "bits_per_param")),
             "peak_bytes": _get(eager, "peak_bytes"), "rss_bytes": _get(eager, "peak_rss_bytes"),
             "decode_ms": _get(eager, "decode_ms_per_token"),
             "decode_ci": (_get(eager, "decode_ms_ci_low"), _get(eager, "decode_ms_ci_high")),
             "compiled_ms": _get(comp, "decode_ms_per_token"),
             "compiled_ci": (_get(comp, "decode_ms_ci_low"), _get(comp, "decode_ms_ci_high")),
             "compiled_skipped": _get(comp_skip, "error_message"),
             "tokens_per_s": _get(eager, "decode_tokens_per_s"), "noisy": eager is not None and _noisy(eager),
             "eager_row": eager, "compiled_row": comp,
             "detail": _detail(d, eager, comp)}
        e["ppl_change"], e["ppl_change_ci"], e["indistinguishable"] = _ppl_change(d, ppl, base_ppl, base_nll,
                                                                                  p == baseline)
        e["broken"] = bool(ppl and base_ppl and ppl > BROKEN_RATIO * base_ppl)
        out.append(e)
    return out


def _ppl_change(d, ppl, base_ppl, base_nll, is_base) -> tuple:
    """Δ perplexity in % against the baseline with its paired 95% interval over the same windows; whether that
    interval holds 0."""
    if is_base or ppl is None or not base_ppl:
        return (0.0 if is_base and ppl else None), None, is_base and ppl is not None
    lo, hi = first(col(d, "ln_ppl_ratio_ci_low")), first(col(d, "ln_ppl_ratio_ci_high"))
    if lo is None and base_nll:  # rows without the interval: from the windows both rows keep
        mine, tokens = first(col(d, "ppl_window_nll")), first(col(d, "ppl_window_tokens"))
        iv = paired_log_ratio(list(mine), base_nll, list(tokens)) if mine is not None and tokens is not None else None
        lo, hi = (iv[1], iv[2]) if iv else (None, None)
    change = (ppl / base_ppl - 1) * 100
    if lo is None:
        return change, None, False
    return change, ((math.exp(lo) - 1) * 100, (math.exp(hi) - 1) * 100), lo <= 0 <= hi


DETAIL = [("TTFT ms", "ttft_ms", "{:.2f}"), ("decode p99 ms", "decode_ms_p99", "{:.2f}"),
          ("prefill tokens/s", "prefill_tokens_per_s", "{:,.0f}"), ("of bandwidth limit", "bandwidth_fraction", "pct"),
          ("floor ms/token", "decode_ms_floor", "{:.3f}"), ("KV cache MB", "kv_cache_bytes", "mb"),
          ("prefill peak MB", "prefill_peak_bytes", "mb"), ("J / decode token", "energy_j_per_decode_token", "{:.3g}"),
          ("J / prefill token", "energy_j_per_prefill_token", "{:.3g}"), ("mean power W", "power_mean_w", "{:.0f}"),
          ("$ / M tokens", "usd_per_million_tokens", "{:.3f}"), ("repeats", "repeats_done", "{:.0f}"),
          ("CV decode", "cv_decode", "pct"), ("host load (1 min)", "host_load_1m", "{:.1f}"),
          ("CPUs others took (most)", "host_other_busy_cpus_max", "{:.1f}"),
          ("host probe ms (before timed runs)", "host_probe_before_ms", "{:.2f}")]
UNIT = [("load s", "load_s", "{:.1f}"), ("quantize s", "quantize_s", "{:.1f}"), ("calibration s", "calibration_s",
                                                                                  "{:.1f}"),
        ("kernel path", "linear_class", "{}"), ("applied", "quant_config", "{}"),
        ("perplexity windows", "ppl_windows", "{:.0f}"), ("tokens scored", "ppl_tokens_scored", "{:,.0f}"),
        ("windows per pass", "ppl_batch_size", "{:.0f}"), ("KL median", "kl_median", "{:.3g}"),
        ("KL p90", "kl_p90", "{:.3g}"), ("KL max", "kl_max", "{:.3g}"), ("Δp mean", "delta_p_mean", "{:+.4f}"),
        ("Δp RMS", "delta_p_rms", "{:.4f}")]


def _fmt(v, how: str) -> str:
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
    out = [(label, _fmt(first(col(d, k)), how)) for label, k, how in UNIT]
    out += [(f"{label} (eager)", _fmt(_get(eager, k), how)) for label, k, how in DETAIL]
    if comp is not None:
        out += [("compile s", _fmt(_get(comp, "compile_s"), "{:.1f}")),
                ("compiled of bandwidth limit", _fmt(_get(comp, "bandwidth_fraction"), "pct"))]
    return [(k, v) for k, v in out if v != "–"]


# ------------------------------------------------------------------------------------------------------ decision

def quality_of(e: dict) -> float | None:
    """The quality coordinate of the decision: KL to the baseline where measured, else |Δ perplexity| in %."""
    if e["kl_mean"] is not None:
        return e["kl_mean"]
    return abs(e["ppl_change"]) / 100 if e["ppl_change"] is not None else None


def decision(entries: list[dict], fits: list[dict]) -> dict:
    """The precisions on the quality × speed × memory frontier (eager and compiled), the best-quality precision that
    fits each budget, and the broken ones."""
    usable = [e for e in entries if not e["broken"] and quality_of(e) is not None]
    out = {"broken": [e["precision"] for e in entries if e["broken"]], "frontier": {}}
    for path, key in (("eager", "decode_ms"), ("compiled", "compiled_ms")):
        pts = {e["precision"]: (quality_of(e), e[key], e["weights_bytes"] or 0) for e in usable if e[key]}
        if pts:
            out["frontier"][path] = [p for p in (e["precision"] for e in entries) if p in frontier(pts)]
    out["budgets"] = []
    for f in fits:
        fitting = [e for e in usable if f["batches"].get(e["precision"], 0) >= 1]
        best = min(fitting, key=lambda e: (quality_of(e), e["decode_ms"] or math.inf), default=None)
        batch = f["batches"].get(best["precision"]) if best else None
        # no quality to rank by (synthetic weights): what fits, and up to which batch, by memory alone
        by_memory = [] if usable else sorted(
            ((e["precision"], f["batches"][e["precision"]]) for e in entries
             if not e["broken"] and f["batches"].get(e["precision"], 0) >= 1), key=lambda pb: -pb[1])
        out["budgets"].append({"budget": f["label"], "context": f["context"],
                               "best": best["precision"] if best else None, "batch": batch,
                               "by_memory": by_memory, "measured_batch": f["measured_batch"],
                               "extrapolated": bool(batch and batch > EXTRAPOLATED * f["measured_batch"]),
                               "extrapolated_by_memory": any(b > EXTRAPOLATED * f["measured_batch"]
                                                             for _, b in by_memory)})
    return out


def fits(df: pd.DataFrame, entries: list[dict], budgets: list[tuple[str, float]]) -> list[dict]:
    """Per budget and context length, the largest batch of each precision (eager, native KV cache) by the memory
    model of reports.fit, at the contexts the sweep measured."""
    d = fit.fitted_rows(df)
    params = {e["precision"]: fit.parameters(d[d.precision == e["precision"]]) for e in entries}
    params = {p: v for p, v in params.items() if v}
    if not params:
        return []
    contexts = sorted({int(x) for x in (d.prompt_tokens + d.new_tokens).dropna()})[-3:]
    measured = int(d[d.status == "ok"].batch_size.max())
    out = []
    for label, size in budgets:
        for context in contexts:
            out.append({"label": label, "bytes": size, "context": context, "measured_batch": measured,
                        "batches": {p: fit.largest_batch(v, context, size) for p, v in params.items()}})
    return out


def fit_allocators(df: pd.DataFrame) -> list[str]:
    """The allocator settings of the rows the memory model is fitted to (eager, native KV cache, ok): one model covers
    them all, so where there are several it is the most conservative of them."""
    d = fit.fitted_rows(df)
    return allocators(d[d.status == "ok"])


def allocators(df: pd.DataFrame) -> list[str]:
    """The allocator settings (cuda_alloc_conf) the rows ran with, PyTorch's default named."""
    return [a or "PyTorch's default" for a in sorted(set(col(df, "cuda_alloc_conf").dropna()))]


def fit_errors(df: pd.DataFrame, entries: list[dict]) -> dict[str, float]:
    d = fit.fitted_rows(df)
    out = {}
    for e in entries:
        cells = d[d.precision == e["precision"]]
        p = fit.parameters(cells)
        err = fit.check(p, cells) if p else None
        if err is not None:
            out[e["precision"]] = err
    return out


# ------------------------------------------------------------------------------------------------------ findings

def findings(entries: list[dict], baseline: str | None, model: str, cell: dict | None, dec: dict,
             cross: list[dict] | None = None) -> list[str]:
    """A handful of sentences, most decisive first, each with its interval; no speed claim from a noisy cell, nor
    one within how far the machine's pace moved between the two precisions' eager cells (crossover's `drift`)."""
    out = []
    base = next((e for e in entries if e["precision"] == baseline), None)
    where = (f"at {cell['prompt_tokens']}+{cell['new_tokens']} tokens, batch {cell['batch_size']}" if cell else "")
    for path in ("eager", "compiled"):
        front = [p for p in dec["frontier"].get(path, []) if p != baseline]
        if front:
            out.append(f"On the quality × speed × memory frontier ({path} decode): {', '.join(front)}"
                       + (f" beside {baseline}" if baseline in dec["frontier"][path] else "") + ".")
    for b in dec["budgets"]:
        if b["best"]:
            out.append(f"Best quality that fits {b['budget']} at {b['context']} tokens: {b['best']} "
                       f"(up to batch {b['batch']:,}" + (f", extrapolated from batches ≤ {b['measured_batch']}"
                                                          if b["extrapolated"] else "") + ").")
    if dec["broken"]:
        out.append(f"Broken (perplexity over {BROKEN_RATIO:g}× the baseline's; left out of the charts): "
                   f"{', '.join(dec['broken'])}.")
    same = [e["precision"] for e in entries if e["indistinguishable"] and e["precision"] != baseline]
    if same:
        out.append(f"Indistinguishable from {baseline} in perplexity (the paired 95% interval of the difference "
                   f"holds 0): {', '.join(same)}.")
    drift = {c["precision"]: c["drift"] for c in cross or [] if c["decode"] == "eager"}
    speed, elsewhere, drifted = [], [], []
    for e in entries:
        if e is base or base is None or e["noisy"] or base["noisy"] or e["broken"]:
            continue
        if e["eager_row"] is None or base["eager_row"] is None:  # failed or skipped at the headline cell
            continue
        if machine(e["eager_row"]) != machine(base["eager_row"]):
            elsewhere.append(e["precision"])
            continue
        iv = _ratio_interval(per_run_decode(e["eager_row"]), per_run_decode(base["eager_row"]))
        word = _verdict(iv, drift.get(e["precision"], 1.0))  # the crossover's rule: beyond 1 and the pace's drift
        if word == "drifted":
            drifted.append(e["precision"])
        elif word in ("faster", "slower"):
            r, lo, hi = (1 / iv[0], 1 / iv[2], 1 / iv[1]) if word == "faster" else iv
            speed.append((abs(math.log(iv[0])), f"{e['precision']} decodes {r:.2f}× {word} than {baseline} "
                                                 f"(95% interval {lo:.2f}–{hi:.2f}×, eager, {where})."))
    out += [s for _, s in sorted(speed, reverse=True)[:3]]
    if elsewhere:
        out.append(f"No speed claim for {', '.join(elsewhere)} against {baseline}: measured on another GPU or host "
                   f"than {baseline}'s cell.")
    if drifted:
        out.append(f"No speed claim for {', '.join(drifted)} against {baseline}: the machine's pace moved between "
                   "their eager cells by more than the two differ (see Faster or slower than "
                   f"{baseline}).")
    noisy = [e["precision"] for e in entries if e["noisy"] and e["decode_ms"]]
    if noisy:
        out.append(f"No speed claim for {', '.join(noisy)}: their timing is noisy (interval wider than "
                   f"±{NOISY_HALFWIDTH:.0%} or coefficient of variation over 5%).")
    return out[:8]


# ------------------------------------------------------------------------------------------------------ crossover

def crossover(df: pd.DataFrame, baseline: str | None) -> list[dict]:
    """Per quantized precision and decode path: its decode ms/token over the baseline's at each (batch, prompt),
    at the longest generation; < 1 is faster. One row per cell: pass data.newest_per_cell's rows (the report does).
    `verdicts`, where both cells ran on one machine: faster, slower or
    even (the 95% interval of the ratio holds 1) as findings() claims speed, noisy where either cell's timing is
    (no claim), unknown where either has fewer than 2 runs; `drift` (pace_drift of both precisions' cells, times each
    other) widens "even": a ratio counts only beyond it ("drifted" inside it)."""
    ok = df[(df.status == "ok") & (df.kv_cache == "native")]
    if baseline is None or ok.empty:
        return []
    n = int(ok.new_tokens.max())
    ok = ok[ok.new_tokens == n]
    out = []
    for path in ("eager", "compiled"):
        base = ok[(ok.precision == baseline) & (ok.decode == path)].set_index(["batch_size", "prompt_tokens"])
        if base.empty:
            continue
        for p in precision_order(ok, baseline):
            if p == baseline:
                continue
            mine = ok[(ok.precision == p) & (ok.decode == path)].set_index(["batch_size", "prompt_tokens"])
            keys = mine.index.intersection(base.index)
            grid = {k: mine.decode_ms_per_token[k] / base.decode_ms_per_token[k] for k in keys}
            apart = {k for k in keys if machine(mine.loc[k]) != machine(base.loc[k])}  # not comparable as speeds
            drift = pace_drift(mine) * pace_drift(base)
            verdicts = {k: "noisy" if _noisy(mine.loc[k]) or _noisy(base.loc[k]) else
                        _verdict(_ratio_interval(per_run_decode(mine.loc[k]), per_run_decode(base.loc[k])), drift)
                        for k in keys if k not in apart}
            if len(grid) >= 1:
                out.append({"precision": p, "decode": path, "new_tokens": n, "ratios": grid, "other_machine": apart,
                            "verdicts": verdicts, "drift": drift, "batches": sorted({b for b, _ in grid}),
                            "prompts": sorted({q for _, q in grid})})
    return out


def pace_drift(cells: pd.DataFrame) -> float:
    """How far the machine's pace moved between one precision's cells (indexed by batch and prompt, one decode path):
    a cell with no smaller batch and no shorter prompt decodes no faster, so where one decoded faster than a lighter
    one on the same machine beyond both 95% intervals, the pace moved between them by at least the lighter's mean over
    the heavier's; the largest such factor, 1 where none (11-30j: the 7B's eager fp16 at 38.7 ms/token at 128 x 8
    and 24.2 at 1024 x 32 in one process, a minute apart)."""
    drift = 1.0
    rows = [(k, r) for k, r in cells.iterrows()
            if val(r.get("decode_ms_ci_low")) is not None and val(r.get("decode_ms_ci_high")) is not None]
    for (light, a), (heavy, b) in ((x, y) for x in rows for y in rows):
        if (light != heavy and heavy[0] >= light[0] and heavy[1] >= light[1] and machine(a) == machine(b)
                and val(b.get("decode_ms_ci_high")) < val(a.get("decode_ms_ci_low"))):
            drift = max(drift, val(a.get("decode_ms_per_token")) / val(b.get("decode_ms_per_token")))
    return drift


def _verdict(interval, drift: float = 1.0) -> str:
    if interval is None:
        return "unknown"
    if interval[2] < 1 / drift:
        return "faster"
    if interval[1] > drift:
        return "slower"
    return "even" if interval[1] <= 1 <= interval[2] else "drifted"


VERDICT_WORDS = {"faster": "faster", "slower": "slower", "even": "within noise of it", "noisy": "noisy timing",
                 "drifted": "within the pace's drift", "unknown": "with one run"}


def where_it_pays(cross: list[dict], baseline: str) -> list[str]:
    """The crossover in words, per quantized precision and decode path: at which batches it decodes faster or slower
    than the baseline, from the crossover's verdicts: a cell counts only where both ran on one machine, neither
    timing is noisy and the ratio's 95% interval excludes 1 and the pace's drift (_verdict, findings()' rule too)."""
    out = []
    for c in cross:
        by_batch: dict[int, dict[str, list[int]]] = {}
        for (b, prompt), v in sorted(c["verdicts"].items()):
            by_batch.setdefault(b, {}).setdefault(v, []).append(prompt)
        parts = []
        for word in VERDICT_WORDS:  # whole batches of one verdict first, then batches of several
            whole = [b for b, vs in by_batch.items() if set(vs) == {word}]
            if whole:
                cells = sum(len(by_batch[b][word]) for b in whole)
                batches = f"batch{'es' * (len(whole) > 1)} {_and(whole)}"
                parts.append(f"{VERDICT_WORDS[word]} at {batches} ({cells} cell{'s' * (cells > 1)})")
        for b, vs in by_batch.items():
            if len(vs) > 1:
                parts.append(f"at batch {b} " + ", ".join(f"{VERDICT_WORDS[v]} at prompt {_and(ps)}"
                                                          for v, ps in vs.items()))
        if c["drift"] > 1:
            parts.append(f"the machine's pace moved between cells by up to {c['drift']:.2f}× (a heavier cell decoded "
                         "faster than a lighter one), and only ratios beyond that count")
        if c["other_machine"]:
            k = len(c["other_machine"])
            parts.append(f"{k} cell{'s' * (k > 1)} against {baseline} on another GPU or host: no verdict")
        out.append(f"{c['precision']}, {c['decode']} decode against {baseline}: " + "; ".join(parts) + ".")
    return out


def _and(items: list) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def every_cell(df: pd.DataFrame, newest: pd.DataFrame | None = None) -> list[dict]:
    """Every cell of a model, its figures formatted; a row not in `newest` (a cell measured again later) is marked
    older."""
    order = ["precision", "decode", "kv_cache", "prompt_tokens", "new_tokens", "batch_size"]
    d = df.sort_values(order + (["run_id"] if "run_id" in df else []))
    out = []
    for _, r in d.iterrows():
        g = (lambda k: val(r.get(k)))
        lo, hi = g("decode_ms_ci_low"), g("decode_ms_ci_high")
        out.append({"precision": r.precision, "decode": r.decode, "kv_cache": r.kv_cache,
                    "prompt_tokens": int(r.prompt_tokens), "new_tokens": int(r.new_tokens),
                    "batch_size": int(r.batch_size), "status": r.status,
                    "older": newest is not None and r.name not in newest.index,
                    "ttft": _fmt(g("ttft_ms"), "{:.2f}"), "decode_ms": _fmt(g("decode_ms_per_token"), "{:.2f}"),
                    "ci": f"{lo:.2f}–{hi:.2f}" if lo is not None and hi is not None else "",
                    "p99": _fmt(g("decode_ms_p99"), "{:.2f}"), "tokens_s": _fmt(g("decode_tokens_per_s"), "{:.1f}"),
                    "peak": _fmt(g("peak_bytes"), "mb"), "kv": _fmt(g("kv_cache_bytes"), "mb"),
                    "joules": _joules(g("energy_j_per_decode_token"), g("decode_energy_bound")),
                    "probe": " / ".join(_fmt(g(f"host_probe_{w}_ms"), "{:.2f}") for w in ("before", "after"))
                    if g("host_probe_before_ms") is not None else ""})
    return out


def _joules(j, bound) -> str:
    """Joules per decode token with the counter's bound on them (relative), where there is one."""
    if j is None or bound is None:
        return _fmt(j, "{:.3g}")
    return _fmt(j, "{:.3g}") + (f" ±{bound:.0%}" if bound >= 0.005 else " ±<1%")


# --------------------------------------------------------------------------------------- the sweep as a whole

def header(df: pd.DataFrame, sweeps: list[str]) -> dict:
    started = pd.to_datetime(col(df, "started_at"), utc=True).dropna()
    ended = pd.to_datetime(col(df, "ended_at"), utc=True).dropna()
    gpus = df.dropna(subset=["gpu_uuid"]) if "gpu_uuid" in df else df.iloc[0:0]
    return {
        "sweeps": sweeps,
        "date": ended.max().strftime("%Y-%m-%d %H:%M UTC") if len(ended) else "–",
        "hosts": sorted(set(col(df, "host").dropna())),
        "gpus": int(gpus.gpu_uuid.nunique()) if len(gpus) else 0,
        "gpu_names": sorted(set(gpus.gpu_name)) if len(gpus) else [],
        "device": "GPU" if len(gpus) else "CPU",
        "wall_s": (ended.max() - started.min()).total_seconds() if len(started) and len(ended) else None,
        "ok": int((df.status == "ok").sum()),
        "failed": int(df.status.isin(FAILED).sum()),
        "skipped": int((df.status == "skipped").sum()),
        "cells": len(df),
    }


def failures(df: pd.DataFrame) -> list[dict]:
    d = df[df.status != "ok"]
    return [{k: val(r.get(k)) for k in ("model", "precision", "decode", "prompt_tokens", "new_tokens", "batch_size",
                                        "status", "error_type", "error_message")} for _, r in d.iterrows()]


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
    rerecorded = rerecorded_compiled(df)
    if len(rerecorded):
        excess = (rerecorded.decode_ms_per_token / rerecorded.apply(replays_ms, axis=1) - 1) * 100
        out.append(f"{len(rerecorded)} compiled cell(s) on a GPU were measured before compiled decode's version "
                   f"{ONE_STATIC_CACHE}: each run made a new static cache, and CUDA graphs were "
                   "recorded again at a run's first step wherever its tensors moved, inside the timed runs. Their "
                   f"decode ms/token are {excess.min():.0f}–{excess.max():.0f}% over the mean of the graph's replays "
                   "alone (bench/compiled_replays.py); the ratios between them are not to be trusted to that "
                   "extent. Measure them again.")
    queued = queued_decode(df)
    if len(queued):
        out.append(f"{len(queued)} cell(s) on a GPU took the host longer to issue a decode step than the GPU took "
                   "between steps, which only happens while the GPU runs steps queued during the prefill: measured "
                   f"before version {measurement_version('eager')} (eager) / {measurement_version('compiled')} "
                   "(compiled), decode did not start from an idle GPU. Their decode ms/token are the GPU's alone; a "
                   "longer generation runs at the slower of the GPU's and the host's pace, which these rows cannot "
                   "tell (the host's figure includes its waits for the prefill). Measure them again: "
                   + _cells(queued, lambda r: f"host {r.decode_host_ms_per_token:.2f}, "
                                              f"GPU {r.decode_ms_per_token:.2f} ms"))
    waited = host_bound(df)
    if len(waited):
        out.append(f"{len(waited)} compiled cell(s) on a GPU decoded host-bound: the host took {HOST_BOUND:.0%} or "
                   "more of each decode step's time to issue it (decode_host_ms_per_token), so the GPU waited for "
                   "the host's Python work. Their decode ms/token are this host's CPU, not the GPU, and move with it: "
                   + _cells(waited, lambda r: f"{r.decode_host_ms_per_token:.2f} of {r.decode_ms_per_token:.2f} ms"))
    crowded = crowded_host(df)
    if len(crowded):
        out.append(f"{len(crowded)} cell(s) were timed while other processes kept at least {CROWDED:.0%} of the "
                   "unit's CPUs busy (host_other_busy_cpus_max): decode that the host paces (on CPU, eager on a GPU, "
                   "compiled cells flagged host-bound) is slower than on a quiet host, by as much as those processes "
                   "took from it: "
                   + _cells(crowded, lambda r: f"up to {r.host_other_busy_cpus_max:.1f} of {r.host_cpus:.0f} CPUs"))
    slowed = slow_host(df)
    if len(slowed):
        out.append(f"{len(slowed)} cell(s) were timed while their host ran plain Python at least {SLOW_HOST:g}× "
                   "slower than it usually did (its pace probe before or after the timed runs, against the median "
                   "of every probe on that host): host-paced decode (on CPU, eager on a GPU, compiled cells flagged "
                   "host-bound) slows with it: "
                   + _cells(slowed, lambda r: f"probe {r.probe_ms:.2f} against {r.usual_ms:.2f} ms"))
    unmeasured = df[numeric(df, "decode_energy_share") < MIN_DECODE_SHARE]
    if len(unmeasured):
        out.append(f"{len(unmeasured)} cell(s) have no joules per decode token: decode's energy is the "
                   "generations' less their prefills' (at the prefill loop's joules per token), and after the "
                   f"prefills decode was less than {MIN_DECODE_SHARE:.0%} of it, so a few percent's error in the "
                   "prefills' energy would be tens of percent of decode's (the Parquet keeps the figure): "
                   + _cells(unmeasured, lambda r: f"decode {r.decode_energy_share:.1%} of the generations' energy"))
    coarse = df[(numeric(df, "decode_energy_bound") > MAX_DECODE_BOUND)
                & ~(numeric(df, "decode_energy_share") < MIN_DECODE_SHARE)]
    if len(coarse):
        out.append(f"{len(coarse)} cell(s) have no joules per decode token: NVML's energy counter moves in steps "
                   "(every 100 ms on an H200) and a reading lags by up to one, so their energy windows were too short "
                   f"to give them within ±{MAX_DECODE_BOUND:.0%} (rows from before the energy window of "
                   f"{ENERGY_WINDOW_S:g} s were read around their timed runs alone; the Parquet keeps the figure): "
                   + _cells(coarse, lambda r: f"±{r.decode_energy_bound:.0%}"))
    if "device" in df and (df.device == "cpu").any():
        out.append("Cells that ran on CPU have no per-phase GPU peaks: their memory is the process's resident set "
                   "(RSS: peak so far, which includes everything the process loaded), and the bandwidth limit is a "
                   "measured CPU copy. No energy is measured on CPU.")
    return out


def _cells(rows: pd.DataFrame, detail) -> str:
    """The first 8 cells of `rows` by model, precision, decode, prompt and batch, each with `detail(row)`."""
    return "; ".join(f"{r.model} × {r.precision} {r.decode} p={r.prompt_tokens} b={r.batch_size} ({detail(r)})"
                     for r in rows.head(8).itertuples()) + ("; …" if len(rows) > 8 else "")


HOST_BOUND = 0.9  # host time to issue a decode step, as a share of the step's device time, from which the GPU waited


def host_bound(df: pd.DataFrame) -> pd.DataFrame:
    """ok compiled GPU cells whose decode steps took the host nearly as long to issue as the GPU took between them.
    Compiled only: a CUDA-graph step is one launch, so a host that keeps up runs ahead; an eager step is hundreds of
    launches, which fill CUDA's launch queue, and then a host waits for the GPU as long as a host-bound one would.
    A host slower than the GPU is `queued_decode`'s."""
    share = _host_share(df)
    return df[(col(df, "status") == "ok") & (col(df, "device") == "cuda") & (col(df, "decode") == "compiled")
              & (share >= HOST_BOUND) & (share <= QUEUED)]


QUEUED = 1.02  # a host's time per step over the GPU's by more than the clocks' disagreement: steps ran from a queue


def queued_decode(df: pd.DataFrame) -> pd.DataFrame:
    """ok GPU cells whose host took longer to issue the decode steps than the GPU took between them. The host's and
    the GPU's sums over a run differ by how far the GPU lagged behind the host at its start less at its end, so this
    happens only while the GPU works off a lead, the prefill's, and the host's slower pace is hidden for as many steps
    as that lead covers; from measurement version 3 (compiled 4) decode starts from an idle GPU, and it cannot."""
    return df[(col(df, "status") == "ok") & (col(df, "device") == "cuda") & (_host_share(df) > QUEUED)]


CROWDED = 0.5  # share of the unit's CPUs other processes kept busy in a stretch of timed runs, from which a caveat


def crowded_host(df: pd.DataFrame) -> pd.DataFrame:
    """ok cells during whose timed runs other processes kept CROWDED or more of the unit's CPUs busy (in a stretch)."""
    busy = numeric(df, "host_other_busy_cpus_max")
    return df[(col(df, "status") == "ok") & (busy >= CROWDED * numeric(df, "host_cpus"))]


SLOW_HOST = 1.5  # a host pace probe this many times the host's median probe: the host ran plain Python slower


def slow_host(df: pd.DataFrame) -> pd.DataFrame:
    """ok cells whose host pace probe (tasks/host_cpu.probe_ms, the slower of before and after the timed runs) took
    SLOW_HOST times the median of every probe on that host or more (3 cells' probes at least), with the two figures
    as `probe_ms` and `usual_ms`. On an H200 host (12-01) the eager cells so flagged had a median 95% interval of
    ±18% against ±4% for the others: the probe sees what /proc/stat cannot (another VM on the core, the clock)."""
    if "host_probe_before_ms" not in df or "host_probe_after_ms" not in df:
        return df.iloc[0:0]
    probes = df[["host_probe_before_ms", "host_probe_after_ms"]].apply(pd.to_numeric, errors="coerce")
    host = col(df, "host").fillna("")
    usual = pd.concat([probes.host_probe_before_ms, probes.host_probe_after_ms]).groupby(
        pd.concat([host, host]).values).median()
    counted = probes.notna().any(axis=1).groupby(host.values).sum()
    out = df.assign(probe_ms=probes.max(axis=1), usual_ms=host.map(usual))
    enough = host.map(counted).fillna(0) >= 3
    return out[(col(df, "status") == "ok") & enough & (out.probe_ms >= SLOW_HOST * out.usual_ms)]


def _host_share(df: pd.DataFrame) -> pd.Series:
    return numeric(df, "decode_host_ms_per_token") / numeric(df, "decode_ms_per_token")


def rerecorded_compiled(df: pd.DataFrame) -> pd.DataFrame:
    """ok compiled cells on a GPU of an older compiled-decode measurement (a new static cache per run)."""
    return df[(col(df, "decode") == "compiled") & (col(df, "status") == "ok") & (col(df, "device") == "cuda")
              & (col(df, "measurement_version").fillna(0) < ONE_STATIC_CACHE)]


def replays_ms(row) -> float | None:
    """The mean decode step with every run's first step left out: under CUDA graphs, the replays alone."""
    rest = [s for r in decode_runs(row) for s in r[1:]]
    return sum(rest) / len(rest) if rest else None


def _human_versions(df: pd.DataFrame) -> str:
    names = [("torch", "torch_version"), ("transformers", "transformers_version"),
             ("bitsandbytes", "bitsandbytes_version"), ("accelerate", "accelerate_version"),
             ("Python", "python_version"), ("CUDA", "cuda_version"), ("driver", "driver_version")]
    parts = [f"{label} {', '.join(sorted(map(str, set(col(df, k).dropna()))))}" for label, k in names
             if len(col(df, k).dropna())]
    attention = sorted(set(col(df, "sdpa_backends").dropna()))
    if attention:
        parts.append(f"attention backends allowed {' / '.join(attention)}")
    alloc = allocators(df)
    if alloc:
        parts.append("allocator " + ", ".join(alloc))
    libs = df.dropna(subset=["quant_library"]) if "quant_library" in df else df.iloc[0:0]
    for lib, versions in libs.groupby("quant_library")["quant_library_version"] if len(libs) else []:
        if lib not in ("torch", "bitsandbytes") and len(versions.dropna()):
            parts.append(f"{lib} {', '.join(sorted(set(versions.dropna())))}")
    return " · ".join(parts)


def protocol(df: pd.DataFrame) -> dict:
    """The protocol and environment for people: sentences and rounded figures with units."""
    ppl = df.dropna(subset=["ppl_windows"]) if "ppl_windows" in df else df.iloc[0:0]
    sentence = None
    if len(ppl):
        r = ppl.iloc[0]
        windows = sorted({int(x) for x in ppl.ppl_windows})
        batches = sorted({int(x) for x in col(ppl, "ppl_batch_size").dropna()})
        protocol, seqlen, stride = val(r.get("ppl_protocol")), val(r.get("ppl_seqlen")), val(r.get("ppl_stride"))
        kind = ("non-overlapping windows, the tail dropped (the GPTQ paper's protocol)" if protocol == "gptq" else
                f"windows every {int(stride)} tokens, each token scored once (Hugging Face's strided)" if stride
                else "protocol not recorded")
        sentence = (f"WikiText-2 raw test split, {' or '.join(map(str, windows))} windows"
                    + (f" of {int(seqlen)} tokens" if seqlen else "") + f": {kind}; "
                    f"{', '.join(map(str, batches)) or 'a recorded number of'} window(s) per forward pass; "
                    f"intervals: Student-t 95% over windows; the distance to the baseline on the same windows over "
                    f"the whole vocabulary.")
    gpus = []
    if "gpu_uuid" in df:
        for (name, host), g in df.dropna(subset=["gpu_uuid"]).groupby(["gpu_name", "host"]):
            mem = first(col(g, "gpu_memory_bytes"))
            bw = first(col(g, "peak_bandwidth_gbs"))
            facts = [f"{mem / 2 ** 30:.0f} GiB" if mem else None, f"{bw:,.0f} GB/s datasheet" if bw else None]
            facts = [f for f in facts if f]
            gpus.append(f"{g.gpu_uuid.nunique()} × {name}" + (f" ({', '.join(facts)})" if facts else "")
                        + f" on {host}")
    if not gpus and "cpu_model" in df and len(df.dropna(subset=["cpu_model"])):
        r = df.dropna(subset=["cpu_model"]).iloc[0]
        gpus.append(f"CPU: {r.cpu_model}, {int(r.cpu_count)} cores, {int(val(r.get('torch_threads')) or 0)} "
                    f"torch threads per unit")
    timing = None
    if "warmup" in df and len(df.dropna(subset=["warmup"])):
        r = df.dropna(subset=["warmup"]).iloc[0]
        reps = sorted({int(x) for x in col(df, "repeats_done").dropna()}) or sorted({int(x) for x in df.repeats.dropna()})
        timing = (f"greedy decoding of exactly new_tokens tokens after {int(r.warmup)} warm-up run(s), "
                  f"{min(reps)}–{max(reps)} timed runs per cell; CUDA events after every step on a GPU (the host "
                  f"clock on CPU); decode ms/token = the mean gap between tokens; intervals: Student-t 95% over "
                  f"runs; memory from {_memory_run(df)} with peak counters reset per phase.") if reps else None
    options = sorted(set(zip(col(df, "precision"), col(df, "precision_options"))), key=str)
    return {"perplexity": sentence, "gpus": gpus, "versions": _human_versions(df), "timing": timing,
            "precision_options": [(p, ", ".join(f"{k}={v}" for k, v in json.loads(o).items()) or "defaults")
                                  for p, o in options if p and isinstance(o, str)]}


def _memory_run(df) -> str:
    """Which run the memory columns come from (rows before the column existed: a run after the timed runs)."""
    seen = sorted(set(col(df, "memory_measured_in").dropna())) or ["a run after the timed runs"]
    return " or ".join(seen)
