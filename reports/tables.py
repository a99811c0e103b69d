"""The report's tables: every cell of a model, the failures, the fit table, the header, the protocol and the
environment. Formatting only: the judgement lives in reports/decision.py, reports/speed.py and reports/caveats.py."""
from __future__ import annotations

import json

import pandas as pd

from reports import fit
from reports.data import FAILED, col, first, manifest, val
from reports.summary import fmt


def every_cell(df: pd.DataFrame, newest: pd.DataFrame | None = None) -> list[dict]:
    """Every cell of a model, its figures formatted; a row not in `newest` (a cell measured again later) is marked
    older."""
    order = ["variant", "decode", "kv_cache", "prompt_tokens", "new_tokens", "batch_size"]
    d = df.sort_values(order + (["run_id"] if "run_id" in df else []))
    out = []
    for _, r in d.iterrows():
        g = (lambda k: val(r.get(k)))
        lo, hi = g("decode_ms_ci_low"), g("decode_ms_ci_high")
        out.append({"precision": r.variant, "decode": r.decode, "kv_cache": r.kv_cache,
                    "prompt_tokens": int(r.prompt_tokens), "new_tokens": int(r.new_tokens),
                    "batch_size": int(r.batch_size), "status": r.status,
                    "older": newest is not None and r.name not in newest.index,
                    "ttft": fmt(g("ttft_ms"), "{:.2f}"), "decode_ms": fmt(g("decode_ms_per_token"), "{:.2f}"),
                    "ci": f"{lo:.2f}–{hi:.2f}" if lo is not None and hi is not None else "",
                    "p99": fmt(g("decode_ms_p99"), "{:.2f}"), "tokens_s": fmt(g("decode_tokens_per_s"), "{:.1f}"),
                    "peak": fmt(g("peak_bytes"), "mb"), "kv": fmt(g("kv_cache_bytes"), "mb"),
                    "joules": _joules(g("energy_j_per_decode_token"), g("decode_energy_bound")),
                    "probe": " / ".join(fmt(g(f"host_probe_{w}_ms"), "{:.2f}") for w in ("before", "after"))
                    if g("host_probe_before_ms") is not None else ""})
    return out


def _joules(j, bound) -> str:
    """Joules per decode token with the counter's bound on them (relative), where there is one."""
    if j is None or bound is None:
        return fmt(j, "{:.3g}")
    return fmt(j, "{:.3g}") + (f" ±{bound:.0%}" if bound >= 0.005 else " ±<1%")


# --------------------------------------------------------------------------------------- the sweep as a whole

def duration(seconds: float | None) -> str:
    """Seconds as people read them, as the sweep prints them: 42.3 s, 6 m 59 s, 7 h 09 m 31 s."""
    if seconds is None:
        return "–"
    s = round(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} m {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} m {s % 60:02d} s"


def wall_time(dirs) -> tuple[float | None, int]:
    """(seconds, runs): each folder's latest sweep's wall time as its command printed it (sweep.json), a study's
    sweeps' together (study.json); summed over the folders."""
    total, runs = 0.0, 0
    for d in dirs:
        m = manifest(d)
        walls = [s.get("wall_s") for s in m.get("sources") or [] if isinstance(s, dict)] or [m.get("wall_s")]
        for w in walls:
            if isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0:
                total, runs = total + w, runs + 1
    return (total if runs else None), runs


def header(df: pd.DataFrame, sweeps: list[str], dirs=()) -> dict:
    ended = pd.to_datetime(col(df, "ended_at"), utc=True).dropna()
    gpus = df.dropna(subset=["gpu_uuid"]) if "gpu_uuid" in df else df.iloc[0:0]
    wall, runs = wall_time(dirs)
    return {
        "sweeps": sweeps,
        "date": ended.max().strftime("%Y-%m-%d %H:%M UTC") if len(ended) else "–",
        "hosts": sorted(set(col(df, "host").dropna())),
        "gpus": int(gpus.gpu_uuid.nunique()) if len(gpus) else 0,
        "gpu_names": sorted(set(gpus.gpu_name)) if len(gpus) else [],
        "device": "GPU" if len(gpus) else "CPU",
        "wall": duration(wall) + (f" ({runs} sweeps)" if runs > 1 else ""),
        "ok": int((df.status == "ok").sum()),
        "failed": int(df.status.isin(FAILED).sum()),
        "skipped": int((df.status == "skipped").sum()),
        "cells": len(df),
    }


def failures(df: pd.DataFrame) -> list[dict]:
    d = df[df.status != "ok"]
    return [{**{k: val(r.get(k)) for k in ("model", "decode", "prompt_tokens", "new_tokens", "batch_size", "status",
                                           "error_type", "error_message")}, "precision": r.variant}
            for _, r in d.iterrows()]


def fit_table(fits_: list[dict], entries: list[dict], extrapolated: int) -> dict:
    """The fit detail, one row per variant and one column per budget and context (narrow whatever the number of
    variants): the largest batch, marked where it is past `extrapolated` × the largest batch measured, with the
    command that would measure it."""
    columns = [(f["label"], f["context"]) for f in fits_]
    rows = []
    for e in entries:
        if e["broken"] or not any(e["precision"] in f["batches"] for f in fits_):
            continue
        cells = []
        for f in fits_:
            n = f["batches"].get(e["precision"])
            far = bool(n and n > extrapolated * f["measured_batch"])
            cells.append({"batch": n, "far": far, "command":
                          f"--set generation.batch_sizes=[{n}] --set generation.prompt_tokens="
                          f"[{max(f['context'] - f['new_tokens'], 1)}]" if far else None})
        rows.append({"precision": e["precision"], "cells": cells})
    return {"columns": columns, "rows": rows}


def _human_versions(df: pd.DataFrame) -> str:
    names = [("torch", "torch_version"), ("transformers", "transformers_version"),
             ("bitsandbytes", "bitsandbytes_version"), ("accelerate", "accelerate_version"),
             ("Python", "python_version"), ("CUDA", "cuda_version"), ("driver", "driver_version")]
    names.append(("vLLM", "engine_version"))
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


def allocators(df: pd.DataFrame) -> list[str]:
    """The allocator settings (cuda_alloc_conf) the rows ran with, PyTorch's default named."""
    return [a or "PyTorch's default" for a in sorted(set(col(df, "cuda_alloc_conf").dropna()))]


def fit_allocators(df: pd.DataFrame) -> list[str]:
    d = fit.fitted_rows(df)
    return allocators(d[d.status == "ok"])


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
                    f"intervals: Student-t 95% over windows on the log scale, none from fewer than 3; the distance "
                    f"to the baseline on the same windows over the whole vocabulary.")
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
        sources = "; ".join(sorted(set(col(df, "timing_source").dropna()))) or \
            "CUDA events after every step on a GPU, the host clock on CPU"
        timing = (f"greedy decoding of exactly new_tokens tokens after {int(r.warmup)} warm-up run(s), "
                  f"{min(reps)}–{max(reps)} timed runs per cell; timed by {sources}; decode ms/token = the mean gap "
                  f"between tokens; intervals: Student-t 95% over runs on the log scale, none from fewer than 3; "
                  f"memory from {' or '.join(sorted(set(col(df, 'memory_measured_in').dropna())))}.") \
            if reps else None
    options = sorted(set(zip(col(df, "variant"), col(df, "precision_options"))), key=str)
    return {"perplexity": sentence, "gpus": gpus, "versions": _human_versions(df), "timing": timing,
            "precision_options": [(p, ", ".join(f"{k}={v}" for k, v in json.loads(o).items()) or "defaults")
                                  for p, o in options if p and isinstance(o, str)]}
