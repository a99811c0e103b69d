"""The report's judgement per model: the decision (which variant to use for each goal the data supports, each pick
with its evidence and interval, and what to avoid), and the findings (a few more facts worth knowing). Every pick
cites measured cells only; where the data cannot support one, the sentence says what to run to get one."""
from __future__ import annotations

from common.stats import MIN_SAMPLES
from reports.data import ENGINE_NAMES
from reports.speed import compare

EXTRAPOLATED = 4  # a predicted largest batch over 4× the largest measured batch is the memory model's, not a pick
ENGINES_APART = 10  # the engines' own distance must be this many times smaller than the closest quantized variant's


def quality_of(e: dict) -> float | None:
    """The quality coordinate: KL to the baseline where measured, else |Δ perplexity| as a fraction."""
    if e["kl_mean"] is not None:
        return e["kl_mean"]
    return abs(e["ppl_change"]) / 100 if e["ppl_change"] is not None else None


def _size(e: dict, base: dict | None) -> str:
    if not e["weights_bytes"]:
        return ""
    times = f", {base['weights_bytes'] / e['weights_bytes']:.1f}× smaller" if base and base["weights_bytes"] else ""
    return f"{e['weights_bytes'] / 1e6:,.0f} MB of weights{times}"


def _quality(e: dict) -> str:
    parts = []
    if e["kl_mean"] is not None:
        parts.append(f"KL {e['kl_mean']:.3g}")
    if e["top1"] is not None:
        parts.append(f"top-1 {e['top1']:.1%}")
    if e["ppl_change"] is not None:
        ci = e["ppl_change_ci"]
        parts.append(f"Δ perplexity {e['ppl_change']:+.1f}%" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else
                                                                 " (too few windows for an interval)"))
    return ", ".join(parts)


def _quantized(e: dict) -> bool:
    """Another float format (fp32, bf16) or the baseline's precision on the other engine is not a quantization."""
    return e["method"] != "unquantized"


def decide(entries: list[dict], baseline: str | None, rows, fits_: list[dict], budget: dict,
           cross: list[dict]) -> dict:
    """{"picks": [sentences], "avoid": [sentences], "runs": [what to run for a pick the data cannot make]}."""
    base = next((e for e in entries if e["precision"] == baseline), None)
    usable = [e for e in entries if not e["broken"] and e["precision"] != baseline]
    picks, runs, avoid = [], [], []
    measured = [e for e in usable if quality_of(e) is not None]
    if not measured:
        runs.append("No quality is measured for this model (synthetic weights, or perplexity off): the picks below "
                    "are by speed and memory alone; a model with real weights and `perplexity:` in the grid gives "
                    "them a quality axis.")
    else:
        few = base is not None and (base.get("ppl_windows") or 0) < MIN_SAMPLES
        # per engine, the baseline's first: a user serving with one engine picks among its variants
        engines = list(dict.fromkeys(([base["engine"]] if base else []) + [e["engine"] for e in measured]))
        for engine in engines:
            through = f" through {ENGINE_NAMES.get(engine, engine)}" if len(engines) > 1 else ""
            for bits in (8, 4):
                group = [e for e in measured if e["weight_bits"] is not None and e["weight_bits"] <= bits
                         and e["engine"] == engine]
                if group:
                    best = min(group, key=quality_of)
                    picks.append(f"Closest to {baseline} at ≤ {bits} bits{through}: {best['precision']} "
                                 f"({_quality(best)}; {_size(best, base)}).")
        quantized = [e for e in measured if _quantized(e)]
        within = [e for e in quantized if _within(e, budget)]
        words = f"KL ≤ {budget['kl']:g}" if all(e["kl_mean"] is not None for e in measured) else \
            f"Δ perplexity within ±{budget['ppl_change_pct']:g}%"
        if within:
            small = min(within, key=lambda e: e["weights_bytes"] or float("inf"))
            picks.append(f"Smallest within the quality budget ({words}): {small['precision']} "
                         f"({_size(small, base)}; {_quality(small)}).")
        elif quantized:
            closest = min(quantized, key=quality_of)
            picks.append(f"Nothing quantized is within the quality budget ({words}); the closest is "
                         f"{closest['precision']} ({_quality(closest)}).")
        if few:
            runs.append(f"Perplexity here comes from {base.get('ppl_windows')} window(s): too few for an interval on "
                        f"Δ perplexity; `--set perplexity.max_windows=null` scores the whole split (KL and top-1 are "
                        f"over every scored position and stand as they are).")
    speed_picks, speed_runs = _speed(entries, baseline, rows, cross)
    picks += speed_picks
    runs += speed_runs
    picks += _memory(entries, fits_)
    broken = [e for e in entries if e["broken"]]
    if broken:
        avoid.append("Broken (perplexity over 10× the baseline's): " + ", ".join(
            f"{e['precision']} ({e['perplexity']:,.1f})" for e in broken) + ".")
    for e, by in _dominated(usable, base):
        avoid.append(f"{e['precision']}: dominated by {by['precision']}, no worse in quality, speed or size and "
                     f"better in one.")
    return {"picks": picks, "avoid": avoid, "runs": runs}


def _within(e: dict, budget: dict) -> bool:
    if e["kl_mean"] is not None:
        return e["kl_mean"] <= budget["kl"]
    ci = e["ppl_change_ci"]
    return ci is not None and -budget["ppl_change_pct"] <= ci[0] and ci[1] <= budget["ppl_change_pct"]


def _speed(entries: list[dict], baseline: str | None, rows, cross: list[dict]) -> tuple[list[str], list[str]]:
    """Per engine, decode path and batch: the fastest variant where a speed claim holds against that engine's
    baseline at every prompt measured (the crossover's verdicts, at the longest generation), or the variants that are
    slower everywhere; what cannot be claimed, grouped by why."""
    picks, runs = [], []
    if baseline is None:
        return picks, runs
    by: dict[tuple, dict] = {}
    for c in cross:
        for (b, prompt), v in c["verdicts"].items():
            slot = by.setdefault((c["against"], c["decode"], b), {})
            slot.setdefault(c["precision"], []).append((prompt, v, c["ratios"].get((b, prompt)),
                                                        c["intervals"].get((b, prompt))))
    unsure: dict[tuple, dict[str, set]] = {}
    for (against, path, b), variants in sorted(by.items(), key=lambda kv: (kv[0][0] != baseline, kv[0][1:])):
        def all_(word):
            return {p: cells for p, cells in variants.items() if all(v == word for _, v, _, _ in cells)}

        faster, slower = all_("faster"), all_("slower")
        if faster:
            best = min(faster, key=lambda p: max(r for _, _, r, _ in faster[p]))
            cells = faster[best]
            lo = min(iv[1] for *_, iv in cells if iv)
            hi = max(iv[2] for *_, iv in cells if iv)
            picks.append(f"Fastest {path} decode at batch {b}: {best}, {_range(cells)} {against}'s ms/token at "
                         f"prompt{'s' * (len(cells) > 1)} {', '.join(str(q) for q in sorted(q for q, *_ in cells))} "
                         f"(95% interval {lo:.2f}–{hi:.2f}×).")
        elif slower:
            picks.append(f"At batch {b}, {path}: nothing measured decodes faster than {against}; slower at every "
                         f"prompt: " + ", ".join(f"{p} {_range(c)}" for p, c in slower.items()) + ".")
        for p, cells in variants.items():
            for _, v, _, _ in cells:
                if v in ("noisy", "unknown", "other-machine", "drifted"):
                    unsure.setdefault((against, path, v), {}).setdefault(p, set()).add(b)
    why = {"noisy": "timing too noisy (an interval wider than ±5%, or runs varying by over 5%)",
           "unknown": "fewer than 3 timed runs", "drifted": "within how far the machine's pace moved",
           "other-machine": "measured on another GPU or host than the baseline"}
    fix = {"noisy": "`generation.repeats: auto` on a quiet machine", "unknown": "`generation.repeats: 5`",
           "drifted": "the cells again, one sweep on a quiet machine",
           "other-machine": "both in one sweep on one machine"}
    for (against, path, v), variants in unsure.items():
        batches = sorted({b for bs in variants.values() for b in bs})
        runs.append(f"No {path} speed claim against {against} at batch{'es' * (len(batches) > 1)} "
                    f"{', '.join(map(str, batches))} for {', '.join(sorted(variants))}: {why[v]}; {fix[v]} gives one.")
    return picks, runs


def _range(cells) -> str:
    rs = [r for _, _, r, _ in cells if r is not None]
    lo, hi = min(rs), max(rs)
    return f"{lo:.2f}×" if abs(hi - lo) < 0.005 else f"{lo:.2f}–{hi:.2f}×"


def _memory(entries: list[dict], fits_: list[dict]) -> list[str]:
    """Per memory budget, at the longest context: the closest variant to the baseline that fits, cited up to the
    batches measured (EXTRAPOLATED × the largest); a larger batch is the memory model's alone (the fit table)."""
    out = []
    if not fits_:
        return out
    longest = max(f["context"] for f in fits_)
    for f in [f for f in fits_ if f["context"] == longest]:
        fitting = [e for e in entries if not e["broken"] and f["batches"].get(e["precision"], 0) >= 1]
        if not fitting:
            out.append(f"Nothing measured fits {f['label']} at {longest} tokens.")
            continue
        best = min(fitting, key=lambda e: (quality_of(e) if quality_of(e) is not None else 0,
                                            -(f["batches"][e["precision"]])))
        n, measured = f["batches"][best["precision"]], f["measured_batch"]
        if n > EXTRAPOLATED * measured:  # past what was measured: the fit table's, not a pick
            out.append(f"For {f['label']} at {longest} tokens: every variant here fits the largest batch measured "
                       f"({measured}); how many more is the memory model's prediction (What fits a GPU).")
            continue
        how = ("the baseline itself fits" if quality_of(best) == 0 else "closest to the baseline that fits"
               if quality_of(best) is not None else "fits the most sequences")
        out.append(f"For {f['label']} at {longest} tokens: {best['precision']} ({how}; up to batch {n:,}, within "
                   f"{EXTRAPOLATED}× the largest batch measured, {measured}).")
    return out


def _dominated(usable: list[dict], base: dict | None) -> list[tuple[dict, dict]]:
    """Variants another one beats: no worse in quality, speed (eager and compiled, where both have it) and size,
    and better in one, with every speed difference a claim on one machine."""
    out = []
    for e in usable:
        for o in usable:
            if o is e or o["engine"] != e["engine"] or quality_of(e) is None or quality_of(o) is None:
                continue
            if not (quality_of(o) <= quality_of(e) and (o["weights_bytes"] or 0) <= (e["weights_bytes"] or 0)):
                continue
            paths = [k for k in ("eager_row", "compiled_row") if e[k] is not None and o[k] is not None]
            if not paths:
                continue
            verdicts = [compare(o[k], e[k])[0] for k in paths]
            if any(v not in ("faster", "even") for v in verdicts):
                continue
            if quality_of(o) < quality_of(e) or (o["weights_bytes"] or 0) < (e["weights_bytes"] or 0) \
                    or "faster" in verdicts:
                out.append((e, o))
                break
    return out


def engines_apart(entries: list[dict], baseline: str | None) -> str | None:
    """The distance between the engines at the baseline's precision against the closest quantized variant's (another
    float format is not a quantization): the engines agree when theirs is ENGINES_APART times smaller."""
    base = next((e for e in entries if e["precision"] == baseline), None)
    if base is None:
        return None
    other = [e for e in entries if e["name"] == base["name"] and e["engine"] != base["engine"]
             and e["kl_mean"] is not None]
    quantized = [e["kl_mean"] for e in entries if e["kl_mean"] is not None and e["name"] != base["name"]
                 and _quantized(e) and not e["broken"]]
    if not other or not quantized:
        return None
    o, q = other[0], min(quantized)
    if o["kl_mean"] * ENGINES_APART <= q:
        return (f"The engines agree: KL({baseline} ‖ {o['precision']}) is {o['kl_mean']:.2g} (top-1 {o['top1']:.1%}), "
                f"{q / max(o['kl_mean'], 1e-12):.0f}× below the closest quantized variant's ({q:.2g}).")
    return (f"The engines disagree: KL({baseline} ‖ {o['precision']}) is {o['kl_mean']:.2g}, not {ENGINES_APART}× "
            f"below the closest quantized variant's ({q:.2g}): distances across engines mix the engine's difference "
            f"with the method's.")


def findings(entries: list[dict], baseline: str | None, cross: list[dict]) -> list[str]:
    out = []
    apart = engines_apart(entries, baseline)
    if apart:
        out.append(apart)
    same = [e["precision"] for e in entries if e["quality_state"] == "≈ baseline"]
    if same:
        out.append(f"Indistinguishable from {baseline} in perplexity (the paired 95% interval of the difference lies "
                   f"within the quality budget): {', '.join(same)}.")
    unresolved = [e["precision"] for e in entries if e["quality_state"] == "not resolved"]
    if unresolved:
        out.append(f"Not resolved against {baseline} in perplexity (the interval holds 0 but reaches past the "
                   f"budget): {', '.join(unresolved)}; their KL says how far their predictions are.")
    for c in cross:
        bands = [k for k, v in c["verdicts"].items() if v == "faster"]
        if bands and len(bands) == len(c["verdicts"]):
            out.append(f"{c['precision']} decodes faster than {c['against']} at every cell measured ({c['decode']}).")
    return out
