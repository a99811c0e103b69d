"""Charts drawn by matplotlib and embedded as inline SVG: one colour per variant in every chart, log scales where
values span orders of magnitude, one scale where variants are compared, no more than 8 series in one axes (facets
instead), ticks that read as the values, broken variants left out of every chart (the tables name them), noisy
timings drawn hollow and grey, and a cell coloured as faster or slower only where the report's speed rule says so
(reports/speed.py); every point's values on hover (an SVG title). No chart is drawn without data."""
from __future__ import annotations

import io
import math
import re
from html import escape

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator  # noqa: E402

from reports.data import method_group, precision_order  # noqa: E402
from reports.speed import VERDICT_WORDS  # noqa: E402

# text.parse_math off: labels come from results folders and are drawn as they are ("$" is a dollar, not mathtext)
plt.rcParams.update({"text.parse_math": False, "svg.fonttype": "none", "font.size": 9, "font.family": "sans-serif",
                     "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "quant-sweep"})
MAX_SERIES = 8
MAX_FACETS = 4


class Hover:
    """Gives artists ids and the texts to show on hover; `svg()` writes them in as SVG titles."""

    def __init__(self):
        self.texts: dict[str, str] = {}

    def __call__(self, artist, text: str):
        gid = f"h{id(self)}-{len(self.texts)}"
        artist.set_gid(gid)
        self.texts[gid] = text

    def svg(self, fig) -> str:
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
        text = buf.getvalue()
        text = text[text.index("<svg"):]
        text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # identifiers of other hosts: none
        text = re.sub(r'\s+xmlns:(dc|cc|rdf)="[^"]*"', "", text)
        for gid, t in self.texts.items():
            text = text.replace(f'<g id="{gid}">', f'<g id="{gid}"><title>{escape(t)}</title>', 1)
        return text


def _values_ticks(ax, values, axis="x"):
    """Log-2 axis whose ticks read as the values themselves (8, 16, 32), not as powers."""
    values = sorted(set(int(v) for v in values))
    getattr(ax, f"set_{axis}scale")("log", base=2)
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(values))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_locator(NullLocator())


PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


def _log(ax, axis="y"):
    """A log axis whose ticks read as plain numbers (100, 0.01), not powers."""
    getattr(ax, f"set_{axis}scale")("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(PLAIN)
    target.set_minor_formatter(NullFormatter())


def _log_if_wide(ax, values, axis="y"):
    v = [x for x in values if x and x > 0]
    if v and max(v) / min(v) > 10:
        _log(ax, axis)


def _groups(precisions: list[str], df: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """Facets of at most MAX_SERIES variants: by method group, split where a group is larger."""
    by = {}
    for p in precisions:
        by.setdefault(method_group(df[df.variant == p]), []).append(p)
    out = []
    for name, ps in by.items():  # (a variant's engine is in its name: one facet group per method)
        for i in range(0, len(ps), MAX_SERIES):
            out.append((name + (f" ({i // MAX_SERIES + 1})" if len(ps) > MAX_SERIES else ""), ps[i:i + MAX_SERIES]))
    return out


def _unstack(fig, notes: list) -> None:
    """Point labels that would cover one another (two engines' points of one precision lie close): each label in
    turn moves down a line until it covers none placed before it, at the figure's final layout."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    for note in notes:
        for _ in range(len(notes)):
            box = note.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed):
                break
            x, y = note.xyann
            note.xyann = (x, y - 9)  # one line of 7-point text
        placed.append(note.get_window_extent(renderer))


def quality(entries: list[dict], colors: dict, cell: dict | None, baseline: str | None) -> str | None:
    """Distance to the baseline (KL, else |Δ perplexity|) against decode ms/token and against weights, with the
    speed's 95% interval as error bars; the frontier circled."""
    path = "eager" if any(e["decode_ms"] for e in entries) else "compiled"
    speed = (lambda e: e["decode_ms"]) if path == "eager" else (lambda e: e["compiled_ms"])
    pts = [dict(e, decode_ms=speed(e), decode_ci=e["decode_ci"] if path == "eager" else e["compiled_ci"],
                noisy=e["noisy"] if path == "eager" else e["compiled_noisy"])
           for e in entries if not e["broken"] and speed(e) and e["weights_bytes"]
           and (e["kl_mean"] is not None or e["ppl_change"] is not None)]
    if len(pts) < 2:
        return None
    use_kl = all(e["kl_mean"] is not None for e in pts)
    q = {e["precision"]: (e["kl_mean"] if use_kl else abs(e["ppl_change"])) for e in pts}
    floor = min([v for v in q.values() if v > 0], default=1e-6) / 3  # the baseline's 0 on a log axis
    hover = Hover()
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), layout="constrained")
    for ax, (key, label) in zip(axes, [("decode_ms", f"decode ms/token ({path})"), ("weights_bytes", "weights MB")]):
        for e in pts:
            x = e[key] / (1e6 if key == "weights_bytes" else 1)
            y = max(q[e["precision"]], floor)
            err = None
            if key == "decode_ms" and e["decode_ci"][0] is not None:
                err = [[x - e["decode_ci"][0]], [e["decode_ci"][1] - x]]
            unsure = key == "decode_ms" and e["noisy"]  # noisy timing: hollow and grey, no claim
            h = ax.errorbar([x], [y], xerr=err, fmt="o", ms=5, color="#999" if unsure else colors[e["precision"]],
                            mfc="none" if unsure else None, ecolor="#888", elinewidth=1, capsize=2,
                            label=e["precision"])
            hover(h[0], f"{e['precision']}: {label} {x:,.2f}; " + (f"KL {q[e['precision']]:.4g}" if use_kl else
                                                                  f"|Δ perplexity| {q[e['precision']]:.2f}%"))
        _log(ax, "y")
        _log_if_wide(ax, [e[key] for e in pts], "x")
        ax.set_xlabel(label)
        ax.set_ylabel("KL to baseline (nats, log)" if use_kl else "|Δ perplexity| % (log)")
        if len(pts) <= 10:
            notes = [ax.annotate(e["precision"], (e[key] / (1e6 if key == "weights_bytes" else 1),
                                                  max(q[e["precision"]], floor)), fontsize=7, xytext=(4, 3),
                                 textcoords="offset points") for e in pts]
            _unstack(fig, notes)
    if len(pts) > 10:
        axes[1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5),
                       ncol=1 + len(pts) // 16)
    where = f"{cell['prompt_tokens']}+{cell['new_tokens']} tokens, batch {cell['batch_size']}" if cell else ""
    noisy = any(e["noisy"] for e in pts)
    fig.suptitle(f"Quality against speed and size ({where}; lower is better on every axis; {baseline} at the "
                 f"bottom" + ("; hollow grey: noisy timing" if noisy else "") + ")", fontsize=9)
    return hover.svg(fig)


def decode_vs_length(df: pd.DataFrame, baseline: str | None, colors: dict, broken: set[str]) -> str | None:
    """Decode ms/token against generation length: a panel per batch size (at most 4) and precision group (at most 8
    lines each), eager, the smallest prompt, with 95% intervals."""
    ok = df[(df.status == "ok") & df.decode_ms_per_token.notna() & (df.decode == "eager")
            & (df.kv_cache == "native") & ~df.variant.isin(broken)] if "decode_ms_per_token" in df else df.iloc[0:0]
    if ok.empty or ok.new_tokens.nunique() < 2:
        return None
    ok = ok[ok.prompt_tokens == ok.prompt_tokens.min()]
    batches = sorted(ok.batch_size.unique())
    if len(batches) > MAX_FACETS:
        step = (len(batches) - 1) / (MAX_FACETS - 1)
        batches = [batches[round(i * step)] for i in range(MAX_FACETS)]
    groups = _groups(precision_order(ok, baseline), ok)
    hover = Hover()
    fig, axes = plt.subplots(len(groups), len(batches), figsize=(3.2 * len(batches) + 1.6, 2.4 * len(groups)),
                             layout="constrained", squeeze=False, sharey=True)  # one scale: variants compared
    for gi, (gname, ps) in enumerate(groups):
        for bi, b in enumerate(batches):
            ax = axes[gi][bi]
            d = ok[ok.batch_size == b]
            for p in ps:
                s = d[d.variant == p].sort_values("new_tokens")
                if len(s):
                    lo = (s.decode_ms_per_token - s.get("decode_ms_ci_low", s.decode_ms_per_token)).fillna(0)
                    hi = (s.get("decode_ms_ci_high", s.decode_ms_per_token) - s.decode_ms_per_token).fillna(0)
                    h = ax.errorbar(s.new_tokens, s.decode_ms_per_token, yerr=[lo, hi], marker="o", ms=3,
                                    color=colors[p], label=p, capsize=2, elinewidth=0.8)
                    hover(h[0], f"{p}, batch {b}: " + ", ".join(f"{int(n)} tokens {v:.2f} ms" for n, v in
                                                               zip(s.new_tokens, s.decode_ms_per_token)))
            _values_ticks(ax, ok.new_tokens)
            ax.set_title(f"{gname}, batch {b}", fontsize=8)
            ax.set_xlabel("new tokens")
            if bi == 0:
                ax.set_ylabel("decode ms/token")
        axes[gi][-1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(f"Decode speed against generation length (eager, {int(ok.prompt_tokens.min())}-token prompts, "
                 f"95% intervals)", fontsize=9)
    return hover.svg(fig)


def prompt_length(df: pd.DataFrame, baseline: str | None, colors: dict, broken: set[str]) -> str | None:
    """TTFT and decode ms/token against prompt length (eager, the smallest batch, the longest generation)."""
    ok = df[(df.status == "ok") & (df.decode == "eager") & (df.kv_cache == "native") & ~df.variant.isin(broken)]
    if ok.empty or ok.prompt_tokens.nunique() < 2:
        return None
    ok = ok[(ok.batch_size == ok.batch_size.min())]
    ok = ok[ok.new_tokens == ok.new_tokens.max()]
    groups = _groups(precision_order(ok, baseline), ok)
    hover = Hover()
    fig, axes = plt.subplots(len(groups), 2, figsize=(8.4, 2.5 * len(groups)), squeeze=False,
                             layout="constrained", sharey="col")  # one scale per figure across the groups
    for gi, (gname, ps) in enumerate(groups):
        for ax, (key, label) in zip(axes[gi], [("ttft_ms", "time to first token, ms"),
                                               ("decode_ms_per_token", "decode ms/token at that depth")]):
            for p in ps:
                s = ok[ok.variant == p].sort_values("prompt_tokens")
                if len(s):
                    (line,) = ax.plot(s.prompt_tokens, s[key], marker="o", ms=3, color=colors[p], label=p)
                    hover(line, f"{p}: " + ", ".join(f"{int(n)} tokens {v:.2f} ms" for n, v in
                                                     zip(s.prompt_tokens, s[key])))
            _values_ticks(ax, ok.prompt_tokens)
            _log_if_wide(ax, ok[key])
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel(label)
            ax.set_title(gname, fontsize=8)
        axes[gi][-1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(f"Prompt length (eager, batch {int(ok.batch_size.min())}, {int(ok.new_tokens.max())} new tokens)",
                 fontsize=9)
    return hover.svg(fig)


def _row(e: dict):
    return e["eager_row"] if e["eager_row"] is not None else e["compiled_row"]


def memory(entries: list[dict], cell: dict | None) -> str | None:
    """Weights, KV cache and the rest of the peak at the headline cell, one horizontal bar per variant (the names
    stay legible however many there are). On CPU: the process's peak resident memory."""
    rows = [e for e in entries if _row(e) is not None and e["weights_bytes"] and not e["broken"]]
    if not rows:
        return None
    gpu = all(e["peak_bytes"] for e in rows)
    hover = Hover()
    fig, ax = plt.subplots(figsize=(7.2, 0.28 * len(rows) + 1.2), layout="constrained")
    names = [e["precision"] for e in rows][::-1]
    for i, e in enumerate(rows[::-1]):
        w = e["weights_bytes"] / 1e6
        if gpu:
            kv = (_row(e).get("kv_cache_bytes") or 0) / 1e6
            rest = max(0.0, e["peak_bytes"] / 1e6 - w - kv)
            parts = [(w, "weights", "#4c72b0"), (kv, "KV cache", "#dd8452"), (rest, "activations + workspace", "#bbb")]
        else:
            parts = [(w, "weights", "#4c72b0"), (max(0.0, (e["rss_bytes"] or 0) / 1e6 - w), "rest of RSS", "#bbb")]
        left = 0.0
        for value, label, color in parts:
            bar = ax.barh(i, value, left=left, color=color, label=label if i == 0 else None)
            hover(bar.patches[0], f"{e['precision']}: {label} {value:,.1f} MB")
            left += value
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("MB")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    where = f"{cell['prompt_tokens']}+{cell['new_tokens']} tokens × batch {cell['batch_size']}" if cell else ""
    ax.set_title(f"Peak memory by part, {where}" if gpu else f"Resident memory on CPU (peak RSS), {where}",
                 fontsize=9)
    return hover.svg(fig)


def energy(entries: list[dict], cell: dict | None) -> str | None:
    rows = [e for e in entries if _row(e) is not None and not e["broken"]
            and _row(e).get("energy_j_per_decode_token") == _row(e).get("energy_j_per_decode_token")
            and _row(e).get("energy_j_per_decode_token")]
    if not rows:
        return None
    hover = Hover()
    fig, ax = plt.subplots(figsize=(7.2, 0.28 * len(rows) + 1.2), layout="constrained")
    for i, e in enumerate(rows[::-1]):
        v = _row(e)["energy_j_per_decode_token"]
        bar = ax.barh(i, v, color="#55a868")
        hover(bar.patches[0], f"{e['precision']}: {v:.4g} J per decode token, "
                              f"{_row(e).get('power_mean_w') or 0:.0f} W mean")
    ax.set_yticks(range(len(rows)), [e["precision"] for e in rows][::-1], fontsize=7)
    _log_if_wide(ax, [_row(e)["energy_j_per_decode_token"] for e in rows], "x")
    ax.set_xlabel("joules per generated token")
    where = f"{cell['prompt_tokens']}+{cell['new_tokens']} tokens × batch {cell['batch_size']}" if cell else ""
    ax.set_title(f"Energy per decode token, {where}", fontsize=9)
    return hover.svg(fig)


def crossover(maps: list[dict]) -> str | None:
    """One heatmap per quantized variant and decode path: its decode ms/token over its baseline's by batch and prompt
    length, green where it is faster and red where slower by the report's speed rule; every other cell grey (noisy,
    within noise, too few runs) or empty (another GPU or host: no ratio)."""
    maps = [m for m in maps if m["ratios"] and len(m["batches"]) * len(m["prompts"]) > 1][:16]
    if not maps:
        return None
    cols = min(4, len(maps))
    rows = math.ceil(len(maps) / cols)
    hover = Hover()
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols + 0.8, 2.6 * rows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(maps):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, maps):
        ratios = [[m["ratios"].get((b, p), math.nan) for p in m["prompts"]] for b in m["batches"]]
        claims = [[math.log2(m["ratios"][(b, p)]) if m["verdicts"].get((b, p)) in ("faster", "slower") else math.nan
                   for p in m["prompts"]] for b in m["batches"]]
        ax.imshow([[0.0 if r == r else math.nan for r in row] for row in ratios], cmap="Greys", vmin=-4, vmax=4,
                  aspect="auto")  # the cells with a ratio but no claim: light grey
        im = ax.imshow(claims, cmap="RdYlGn_r", vmin=-1, vmax=1, aspect="auto")
        for i, b in enumerate(m["batches"]):
            for j, p in enumerate(m["prompts"]):
                v, word = m["ratios"].get((b, p)), m["verdicts"].get((b, p))
                text = f"{v:.2f}" if v is not None else "–"
                t = ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="#333" if word in ("faster", "slower") else "#777")
                hover(t, f"{m['precision']} ({m['decode']}), batch {b}, prompt {p}: " + (
                    f"{v:.2f}× {m['against']}'s ms/token, {VERDICT_WORDS.get(word, word)}" if v is not None else
                    f"measured on another GPU or host than {m['against']}: no ratio"))
        ax.set_xticks(range(len(m["prompts"])), m["prompts"], fontsize=7)
        ax.set_yticks(range(len(m["batches"])), m["batches"], fontsize=7)
        ax.set_xlabel("prompt tokens", fontsize=7)
        ax.set_ylabel("batch", fontsize=7)
        ax.set_title(f"{m['precision']}\n{m['decode']}, against {m['against']}", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6, label="ms/token ÷ baseline's (log scale)",
                 ticks=[-1, 0, 1]).ax.set_yticklabels(["0.5", "1", "2"])
    fig.suptitle("Where quantization pays: decode time against the baseline's (below 1: faster; coloured only where "
                 "the difference is a claim, grey: noise or too few runs)", fontsize=8)
    return hover.svg(fig)
