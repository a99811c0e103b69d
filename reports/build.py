"""Render one self-contained HTML report (inline CSS, inline SVG charts, no request to any other host) from one or
more sweep output folders. Reads only the Parquet rows, so any past sweep can be re-rendered."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from reports import charts, tables
from reports.data import col, first, precision_order, read_results

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _mb(x):
    return "–" if x is None else f"{x / 1e6:,.1f}"


def _num(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters.update(mb=_mb, num=_num,
                       pct=lambda x: "–" if x is None else f"{x:+.1f}%",
                       frac=lambda x: "–" if x is None else tables.percent(x),
                       times=lambda x: "–" if x is None else f"{x:.2f}×")
    return env


def context(dirs, every_row: bool = False) -> dict:
    unreadable: list[str] = []
    df = read_results(dirs, unreadable, every_row)
    sweeps = sorted(set(df.sweep.dropna())) if "sweep" in df else []
    models = []
    for model in list(dict.fromkeys(df.model.dropna())) if len(df) else []:
        every = df[df.model == model]
        # tables and charts: the eager path with the native KV cache; the other axes have tables of their own
        d = every[(col(every, "decode").fillna("eager") == "eager") & (col(every, "kv_cache").fillna("native") == "native")]
        baseline = first(d.baseline) if "baseline" in d else None  # rows say what their sweep compared against
        baseline = baseline if baseline in set(d.precision) else (precision_order(d, None) or [None])[0]
        rows, cell = tables.model_table(d, baseline)
        models.append({
            "name": model,
            "baseline": baseline,
            "note": tables.first(d.weights_note) if "weights_note" in d else None,
            "rows": rows,
            "cell": cell,
            "breakdown": tables.breakdown(every, baseline),
            "compiled": tables.eager_vs_compiled(every, baseline),
            "kv": tables.kv_cache_table(every[col(every, "decode").fillna("eager") == "eager"], baseline),
            "kernels": tables.top_kernels(every, baseline, cell),
            "findings": tables.findings(d, model, baseline),
            "charts": [c for c in (charts.decode_vs_length(d, baseline), charts.memory_by_phase(rows, cell),
                                   charts.quality_tradeoffs(rows)) if c],
        })
    return {
        "title": " + ".join(sweeps) or "empty sweep",
        "header": tables.header(df, sweeps) if len(df) else None,
        "models": models,
        "failures": tables.failures(df) if len(df) else [],
        "caveats": tables.caveats(df) if len(df) else [],
        "protocol": tables.protocol(df) if len(df) else None,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sources": [str(d) for d in dirs],
        "unreadable": unreadable,
    }


def render(dirs, target, every_row: bool = False) -> tuple[Path, list[str]]:
    """Write the report (each folder's latest grid's cells, or `every_row`); returns its path and the result files
    that could not be read (left out, named there)."""
    ctx = context(list(dirs), every_row)
    html = _env().get_template("report.html.j2").render(**ctx)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(html)
    tmp.replace(target)
    return target, ctx["unreadable"]
