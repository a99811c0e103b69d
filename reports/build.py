"""Render one self-contained HTML report (inline CSS, inline SVG charts, no request to any other host) from one or
more sweep output folders or studies. Reads only their Parquet rows and manifests, so any past sweep can be
re-rendered; every row is upgraded to the current schema on read (reports/migrate.py)."""
from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape

from common.untrusted import check_file_slot, open_folder, write_into
from reports import caveats, charts, decision, fit, speed, summary, tables
from reports.data import colors, first, manifest, newest_per_cell, precision_order, read_results, report_baseline, \
    with_decode_energy

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _mb(x):
    return "–" if x is None else f"{x / 1e6:,.1f}"


def _num(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def _interval(pair, fmt="{:.2f}"):
    lo, hi = pair if pair else (None, None)
    return "" if lo is None or hi is None else f"{fmt.format(lo)}–{fmt.format(hi)}"


def _code(text) -> Markup:
    """Plain text, escaped, with `backticked` spans as code (the decision's commands and grid fields)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters.update(mb=_mb, num=_num, interval=_interval, code=_code,
                       signed=lambda p: "" if not p or p[0] is None else f"[{p[0]:+.1f}, {p[1]:+.1f}]",
                       pct=lambda x: "–" if x is None else f"{x:+.1f}%",
                       share=lambda x: "–" if x is None else (f"{x:.1%}" if x < 0.9995 else "100%"))
    return env


def budgets_of(dirs, df) -> list[tuple[str, float]]:
    """Memory budgets for the fit: the GPU that ran the sweep, then those the grids list (report.memory_budgets)."""
    out = []
    gpu = df.dropna(subset=["gpu_memory_bytes"]) if "gpu_memory_bytes" in df else df.iloc[0:0]
    if len(gpu):
        out.append((f"this {first(gpu.gpu_name)} ({gpu.gpu_memory_bytes.max() / fit.GiB:.0f} GiB)",
                    float(gpu.gpu_memory_bytes.max())))
    for d in dirs:
        for b in _report_settings(d).get("memory_budgets") or []:
            try:
                size = fit.parse_size(b)
            except (TypeError, ValueError):
                continue  # a manifest is untrusted: what is not a size is left out
            if 2 ** 20 <= size <= 2 ** 50 and all(abs(size - s) > 1 for _, s in out):
                out.append((fit.budget_label(size), size))
    return out


def _report_settings(d) -> dict:
    grid = manifest(d).get("grid")
    report = grid.get("report") if isinstance(grid, dict) else None
    return report if isinstance(report, dict) else {}


def quality_budget(dirs) -> dict:
    """The grids' report.quality_budget (the first folder's that sets one), else the default."""
    for d in dirs:
        b = _report_settings(d).get("quality_budget")
        if isinstance(b, dict):
            ok = {k: float(v) for k, v in b.items() if k in summary.QUALITY_BUDGET
                  and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6}
            return {**summary.QUALITY_BUDGET, **ok}
    return dict(summary.QUALITY_BUDGET)


def model_context(every, budgets, palette, budget) -> dict:
    d = newest_per_cell(every)  # a cell measured twice (report --all) counts with its newest run
    baseline = report_baseline(d)
    cell = summary.headline_cell(d)
    entries = summary.entries(d, baseline, cell, budget)
    variants = [e["precision"] for e in entries]
    fits = fit.fits(d, variants, budgets)
    cross = [c for c in speed.crossover(d, baseline, every)
             if c["precision"] not in {e["precision"] for e in entries if e["broken"]}]
    broken = {e["precision"] for e in entries if e["broken"]}
    return {
        "baseline": baseline, "cell": cell, "entries": entries,
        "decision": decision.decide(entries, baseline, d, fits, budget, cross),
        "findings": decision.findings(entries, baseline, cross),
        "note": first(d.weights_note) if "weights_note" in d else None,
        "fits": fits, "fit_table": tables.fit_table(fits, entries, decision.EXTRAPOLATED),
        "fit_errors": fit.errors(d, variants), "fit_allocators": tables.fit_allocators(d),
        "crossover": cross, "pays": speed.where_it_pays(cross), "throughput": speed.throughput(d, baseline),
        "cells": tables.every_cell(every, newest=d),
        "charts": [c for c in (charts.quality(entries, palette, cell, baseline),
                               charts.decode_vs_length(d, baseline, palette, broken),
                               charts.prompt_length(d, baseline, palette, broken),
                               charts.memory(entries, cell), charts.energy(entries, cell),
                               charts.crossover(cross)) if c],
        "gpu": bool(d.device.eq("cuda").any()) if "device" in d else False,
        "budget": budget,
    }


def context(dirs, every_row: bool = False) -> dict:
    unreadable: list[str] = []
    df = read_results(dirs, unreadable, every_row)
    df = with_decode_energy(df) if len(df) else df
    sweeps = sorted(set(df.sweep.dropna())) if "sweep" in df else []
    budgets = budgets_of(dirs, df) if len(df) else []
    budget = quality_budget(dirs)
    palette = colors(precision_order(df, None)) if len(df) else {}
    models = [{"name": model, **model_context(df[df.model == model], budgets, palette, budget)}
              for model in (list(dict.fromkeys(df.model.dropna())) if len(df) else [])]
    return {
        "title": " + ".join(sweeps) or "empty sweep",
        "header": tables.header(df, sweeps, dirs) if len(df) else None,
        "models": models,
        "failures": tables.failures(df) if len(df) else [],
        "caveats": caveats.caveats(df) if len(df) else [],
        "protocol": tables.protocol(df) if len(df) else None,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sources": [str(d) for d in dirs],
        "unreadable": unreadable,
        "every_row": every_row,
        "reserve_gib": fit.RESERVE / fit.GiB,
        "extrapolated": decision.EXTRAPOLATED,
    }


def render(dirs, target, every_row: bool = False) -> tuple[Path, list[str]]:
    """Write the report (each folder's latest grid's cells, or `every_row`); returns its path and the result files
    that could not be read (left out, named there)."""
    target = Path(target)
    check_target(target)
    ctx = context(list(dirs), every_row)
    html = _env().get_template("report.html.j2").render(**ctx)
    return write_into(target.parent, target.name, html.encode()), ctx["unreadable"]


def check_target(target: Path) -> None:
    """The report's file: nothing there yet, or a regular file (never a link, a folder or a FIFO)."""
    fd = open_folder(target.parent)
    try:
        check_file_slot(fd, target.name, target.parent)
    finally:
        os.close(fd)
