"""When one variant decodes faster or slower than another, and when the data cannot say: the one rule every speed
claim in the report follows (the decision, the findings, the crossover and its charts).

A claim needs both cells on one machine (GPU, or host on CPU: hosts of one GPU type decode the same model up to 45%
apart), neither timing noisy (its 95% interval wider than ±5%, or its runs varying by over 5%), at least MIN_SAMPLES
timed runs each, and the 95% interval of the ratio of their runs' means beyond 1 and beyond how far the machine's pace
moved between that variant's own cells (`pace_drift`)."""
from __future__ import annotations

import math

import pandas as pd

from common.stats import mean_interval, t975
from reports.data import engine_baseline, first, per_run_decode, precision_order, val

NOISY_HALFWIDTH = 0.05  # a speed whose 95% interval is wider than ±5% of it makes no claim
VERDICT_WORDS = {"faster": "faster", "slower": "slower", "even": "within noise of it", "noisy": "noisy timing",
                 "drifted": "within the pace's drift", "unknown": "too few runs"}


def ratio_interval(a: list[float], b: list[float]) -> tuple[float, float, float] | None:
    """mean(a) / mean(b) with a 95% interval (independent runs; the delta method on the log ratio), None with fewer
    than MIN_SAMPLES runs on either side."""
    ia, ib = mean_interval(a), mean_interval(b)
    if ia is None or ib is None:
        return None
    ma, mb = ia[0], ib[0]
    sa = math.log(ia[2] / ma) / t975(len(a) - 1)  # standard errors, relative
    sb = math.log(ib[2] / mb) / t975(len(b) - 1)
    se = math.sqrt(sa ** 2 + sb ** 2)
    r, t = ma / mb, t975(min(len(a), len(b)) - 1)
    return r, r * math.exp(-t * se), r * math.exp(t * se)


def noisy(row) -> bool:
    """Timing too uncertain for a speed claim: its 95% interval wider than ±5%, its runs' coefficient of variation
    over 5%, or too few runs for an interval."""
    if row is None:
        return True
    half, cv = val(row.get("decode_ci_rel_halfwidth")), val(row.get("cv_decode"))
    return half is None or half > NOISY_HALFWIDTH or (cv is not None and cv > 0.05)


def machine(r) -> str | None:
    """Where a cell's timing was taken: its GPU (uuid), or its host on CPU."""
    if r is None:
        return None
    return val(r.get("gpu_uuid")) or val(r.get("host"))


def verdict(interval, drift: float = 1.0) -> str:
    if interval is None:
        return "unknown"
    if interval[2] < 1 / drift:
        return "faster"
    if interval[1] > drift:
        return "slower"
    return "even" if interval[1] <= 1 <= interval[2] else "drifted"


def compare(mine, base, drift: float = 1.0) -> tuple[str, tuple | None]:
    """(verdict, ratio interval) of one cell against the baseline's: other-machine, noisy, unknown, or the ratio's."""
    if machine(mine) != machine(base):
        return "other-machine", None
    if noisy(mine) or noisy(base):
        return "noisy", None
    iv = ratio_interval(per_run_decode(mine), per_run_decode(base))
    return verdict(iv, drift), iv


def pace_drift(cells: pd.DataFrame) -> float:
    """How far the machine's pace moved between one variant's cells (indexed by batch and prompt, one decode path): a
    cell with no smaller batch and no shorter prompt decodes no faster, so where one decoded faster than a lighter one
    on the same machine beyond both 95% intervals, the pace moved between them by at least the lighter's mean over the
    heavier's; the largest such factor, 1 where none."""
    drift = 1.0
    rows = [(k, r) for k, r in cells.iterrows()
            if val(r.get("decode_ms_ci_low")) is not None and val(r.get("decode_ms_ci_high")) is not None]
    for (light, a), (heavy, b) in ((x, y) for x in rows for y in rows):
        if (light != heavy and heavy[0] >= light[0] and heavy[1] >= light[1] and machine(a) == machine(b)
                and val(b.get("decode_ms_ci_high")) < val(a.get("decode_ms_ci_low"))):
            drift = max(drift, val(a.get("decode_ms_per_token")) / val(b.get("decode_ms_per_token")))
    return drift


def crossover(df: pd.DataFrame, baseline: str | None, every: pd.DataFrame | None = None) -> list[dict]:
    """Per quantized variant and decode path: its decode ms/token over its engine's baseline's at each (batch,
    prompt), at the longest generation; < 1 is faster. `df`: one row per cell (data.newest_per_cell's); `every`: all
    rows, where the baseline's cell measured on the variant's own machine is looked for (a study keeps each machine's
    row). `verdicts` by the module's rule; `ratios` only where both cells ran on one machine."""
    every = df if every is None else every
    ok = df[(df.status == "ok") & (df.kv_cache == "native")]
    pool = every[(every.status == "ok") & (every.kv_cache == "native")]
    if baseline is None or ok.empty:
        return []
    n = int(ok.new_tokens.max())
    ok, pool = ok[ok.new_tokens == n], pool[pool.new_tokens == n]
    out = []
    for path in ("eager", "compiled"):
        for p in precision_order(ok, baseline):
            engine = first(ok[ok.variant == p].engine) or "hf"
            against = engine_baseline(ok, baseline, engine)
            if p == against:
                continue
            mine = ok[(ok.variant == p) & (ok.decode == path)].set_index(["batch_size", "prompt_tokens"])
            bases = pool[(pool.variant == against) & (pool.decode == path)]
            if mine.empty or bases.empty:
                continue
            pairs = {}
            for k, row in mine.iterrows():
                same = bases[(bases.batch_size == k[0]) & (bases.prompt_tokens == k[1])]
                if len(same):
                    local = same[[machine(r) == machine(row) for _, r in same.iterrows()]]
                    pick = local if len(local) else same
                    pairs[k] = (row, pick.sort_values("run_id").iloc[-1] if "run_id" in pick else pick.iloc[-1])
            if not pairs:
                continue
            base = pd.DataFrame([b for _, b in pairs.values()], index=pd.MultiIndex.from_tuples(list(pairs)))
            drift = pace_drift(mine.loc[list(pairs)]) * pace_drift(base)
            verdicts, ratios, intervals = {}, {}, {}
            for k, (row, b) in pairs.items():
                verdicts[k], intervals[k] = compare(row, b, drift)
                if verdicts[k] != "other-machine":
                    ratios[k] = row.decode_ms_per_token / b.decode_ms_per_token
            out.append({"precision": p, "against": against, "decode": path, "new_tokens": n, "ratios": ratios,
                        "intervals": intervals, "verdicts": verdicts, "drift": drift,
                        "other_machine": {k for k, v in verdicts.items() if v == "other-machine"},
                        "batches": sorted({b for b, _ in pairs}), "prompts": sorted({q for _, q in pairs})})
    return out


def where_it_pays(cross: list[dict]) -> list[str]:
    """The crossover in words, per variant and decode path: at which batches it decodes faster or slower than its
    baseline, a cell counting only as the module's rule allows."""
    out = []
    for c in cross:
        by_batch: dict[int, dict[str, list[int]]] = {}
        for (b, prompt), v in sorted(c["verdicts"].items()):
            by_batch.setdefault(b, {}).setdefault(v, []).append(prompt)
        parts = []
        for word, text in VERDICT_WORDS.items():  # whole batches of one verdict first, then batches of several
            whole = [b for b, vs in by_batch.items() if set(vs) == {word}]
            if whole:
                cells = sum(len(by_batch[b][word]) for b in whole)
                parts.append(f"{text} at batch{'es' * (len(whole) > 1)} {_and(whole)} ({cells} cell{'s' * (cells > 1)})")
        for b, vs in by_batch.items():
            if len(vs) > 1:
                parts.append(f"at batch {b} " + ", ".join(
                    f"{VERDICT_WORDS.get(v, 'on another GPU or host')} at prompt {_and(ps)}" for v, ps in vs.items()))
        if c["drift"] > 1:
            parts.append(f"the machine's pace moved between cells by up to {c['drift']:.2f}× (a heavier cell decoded "
                         "faster than a lighter one), and only ratios beyond that count")
        if c["other_machine"]:
            k = len(c["other_machine"])
            parts.append(f"{k} cell{'s' * (k > 1)} against {c['against']} on another GPU or host: no verdict")
        out.append(f"{c['precision']}, {c['decode']} decode against {c['against']}: " + "; ".join(parts) + ".")
    return out


def _and(items: list) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def throughput(df: pd.DataFrame, baseline: str | None) -> list[dict]:
    """Per variant with an offline throughput figure (one per unit, the same on its rows): tokens/s with its 95%
    interval, the requests it ran, and its ratio to its engine's baseline measured with the same requests on the same
    machine (None where there is none; the ratio's interval from both sides' timed runs)."""
    if "throughput_tokens_per_s" not in df:
        return []
    d = df[df.throughput_tokens_per_s.notna()]
    settings = ["throughput_requests", "throughput_prompt_tokens", "throughput_new_tokens", "throughput_decode"]
    first_rows = {v: g.iloc[0] for v, g in d.groupby("variant", sort=False)}
    out = []
    for v in precision_order(d, baseline):
        r = first_rows[v]
        base_v = engine_baseline(df, baseline, val(r.get("engine")) or "hf")
        b = first_rows.get(base_v)
        same = (b is not None and v != base_v and machine(b) == machine(r)
                and all(val(b.get(k)) == val(r.get(k)) for k in settings))
        seconds = ratio_interval(list(r.throughput_s_samples), list(b.throughput_s_samples)) if same else None
        ratio = (1 / seconds[0], 1 / seconds[2], 1 / seconds[1]) if seconds else None  # tokens/s over the baseline's
        out.append({"variant": v, "tokens_per_s": val(r.throughput_tokens_per_s),
                    "interval": (val(r.throughput_ci_low), val(r.throughput_ci_high)),
                    "requests": int(r.throughput_requests), "prompt_tokens": int(r.throughput_prompt_tokens),
                    "new_tokens": int(r.throughput_new_tokens), "decode": val(r.throughput_decode),
                    "versus": base_v if ratio else None, "ratio": ratio,
                    "verdict": VERDICT_WORDS[verdict(seconds)] if seconds else None})
    return out
