"""Charts drawn by matplotlib and embedded as inline SVG (text as paths: no font is fetched)."""
from __future__ import annotations

import io
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from reports.data import pareto, precision_order  # noqa: E402

plt.rcParams.update({"svg.fonttype": "path", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                     "svg.hashsalt": "quant-sweep"})
MAX_FACETS = 4


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    # drop the RDF metadata block and its namespaces: identifiers only, but a self-contained page names no other host
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return re.sub(r'\s+xmlns:(dc|cc|rdf)="[^"]*"', "", text)


def _colors(precisions: list[str]) -> dict[str, str]:
    cmap = plt.get_cmap("tab10")
    return {p: cmap(i % 10) for i, p in enumerate(precisions)}


def decode_vs_length(df: pd.DataFrame, baseline: str | None) -> str | None:
    """Decode ms/token against generation length, a line per precision, one panel per batch size."""
    ok = df[(df.status == "ok") & df.decode_ms_per_token.notna()] if "decode_ms_per_token" in df else df.iloc[0:0]
    if ok.empty:
        return None
    batches = sorted(ok.batch_size.unique())
    if len(batches) > MAX_FACETS:  # keep the smallest, largest and evenly spaced ones between
        step = (len(batches) - 1) / (MAX_FACETS - 1)
        batches = [batches[round(i * step)] for i in range(MAX_FACETS)]
    precs = precision_order(ok, baseline)
    colors = _colors(precs)
    fig, axes = plt.subplots(1, len(batches), figsize=(3.4 * len(batches), 2.8), squeeze=False, sharey=False)
    for ax, b in zip(axes[0], batches):
        d = ok[ok.batch_size == b]
        for p in precs:
            s = d[d.precision == p].sort_values("new_tokens")
            if len(s):
                ax.plot(s.new_tokens, s.decode_ms_per_token, marker="o", ms=3, label=p, color=colors[p])
        ax.set_title(f"batch {b}")
        ax.set_xlabel("new tokens")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("decode ms / token")
    axes[0][-1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    return _svg(fig)


def memory_by_phase(rows: list[dict], cell) -> str | None:
    """Stacked bars at the headline cell: weights, KV cache, and activations (peak minus both)."""
    rows = [r for r in rows if r["status"] == "ok" and r["weights_bytes"]]
    if not rows:
        return None
    names = [r["precision"] for r in rows]
    w = [r["weights_bytes"] / 1e6 for r in rows]
    kv = [(r["kv_cache_bytes"] or 0) / 1e6 for r in rows]
    peak = [max(r["decode_peak_bytes"] or 0, r["prefill_peak_bytes"] or 0) / 1e6 for r in rows]
    act = [max(0.0, p - a - b) if p else 0.0 for p, a, b in zip(peak, w, kv)]
    fig, ax = plt.subplots(figsize=(max(3.5, 0.7 * len(rows) + 1.5), 2.8))
    ax.bar(names, w, label="weights", color="#4c72b0")
    ax.bar(names, kv, bottom=w, label="KV cache", color="#dd8452")
    ax.bar(names, act, bottom=[a + b for a, b in zip(w, kv)], label="activations + workspace", color="#bbbbbb")
    ax.set_ylabel("MB")
    title = f"memory at {cell[0]} tokens × batch {cell[1]}" if cell else "memory"
    ax.set_title(title if any(peak) else title + " (no GPU peaks: CPU)")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    return _svg(fig)


def quality_tradeoffs(rows: list[dict]) -> str | None:
    """Perplexity against decode ms/token and against peak (or weight) memory, Pareto frontier marked."""
    pts = [r for r in rows if r["status"] == "ok" and r["perplexity"] and r["decode_ms_per_token"]
           and (r["decode_peak_bytes"] or r["weights_bytes"])]
    if len(pts) < 1:
        return None
    use_peak = all(r["decode_peak_bytes"] for r in pts)
    mem_key = "decode_peak_bytes" if use_peak else "weights_bytes"
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 2.9))
    colors = _colors([r["precision"] for r in rows])
    for ax, (xkey, xlabel, scale) in zip(axes, [("decode_ms_per_token", "decode ms / token", 1.0),
                                                (mem_key, "peak MB" if use_peak else "weights MB", 1e-6)]):
        xy = [(r[xkey] * scale, r["perplexity"], r["precision"]) for r in pts]
        front = pareto(xy)
        for x, y, p in xy:
            ax.scatter([x], [y], color=colors[p], s=40 if p in front else 18, zorder=3,
                       edgecolors="black" if p in front else "none")
            ax.annotate(p, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        fx = sorted((x, y) for x, y, p in xy if p in front)
        if len(fx) > 1:
            ax.plot([x for x, _ in fx], [y for _, y in fx], "--", color="black", lw=0.8, label="Pareto frontier")
            ax.legend(fontsize=7, frameon=False)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
    return _svg(fig)
