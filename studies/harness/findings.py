"""The tables of docs/findings.md, made from the studies' datasets with the report's own rules (reports/): run it
after publishing a study, and paste nothing by hand. A test checks that the page holds what this prints.

  python3 studies/harness/findings.py [--write]     # print each table, or rewrite them in docs/findings.md

Each table sits in docs/findings.md between `<!-- table:NAME -->` and `<!-- /table:NAME -->`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from reports import decision, fit, speed, summary  # noqa: E402
from reports.data import newest_per_cell, read_results, report_baseline, with_decode_energy  # noqa: E402

STUDIES = ROOT / "studies"
PAGE = ROOT / "docs" / "findings.md"


def rows(study: str):
    return with_decode_energy(read_results([STUDIES / study]))


def _ci(lo, hi, fmt="{:.2f}") -> str:
    return f"[{fmt.format(lo)} to {fmt.format(hi)}]" if lo is not None and hi is not None else "[too few windows]"


def _entries(study: str) -> tuple[list[dict], str]:
    """The study's variants, of the model(s) whose quality it measured."""
    d = newest_per_cell(rows(study))
    d = d[d.model.isin(set(d[d.perplexity.notna()].model))] if d.perplexity.notna().any() else d
    base = report_baseline(d)
    return summary.entries(d, base, summary.headline_cell(d)), base


def quality(study: str = "quality-smollm2") -> str:
    entries, base = _entries(study)
    entries = [e for e in entries if e["perplexity"] is not None or e["kl_mean"] is not None]
    entries.sort(key=lambda e: (e["kl_mean"] is None, e["kl_mean"] or 0))
    out = ["| precision | what it quantizes | perplexity [95%] | Δ vs fp16 [paired 95%] | KL to fp16 | top-1 | "
           "weights MB |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        ppl = e["perplexity"]
        ppl_s = f"{ppl:,.2f} {_ci(*e['ppl_ci'])}" if ppl is not None and ppl < 1e4 else (
            f"{ppl:,.0f}" if ppl is not None else "–")
        change = "–" if e["precision"] == base or e["ppl_change"] is None else (
            f"{e['ppl_change']:+.2f}% {_ci(*e['ppl_change_ci'], fmt='{:+.2f}')}" if abs(e["ppl_change"]) < 1e4
            else "broken")
        out.append(f"| {e['precision']} | {e['method']} | {ppl_s} | {change} | "
                   f"{'–' if e['kl_mean'] is None else format(e['kl_mean'], '.3g')} | "
                   f"{'–' if e['top1'] is None else format(e['top1'], '.1%')} | "
                   f"{'–' if not e['weights_bytes'] else format(e['weights_bytes'] / 1e6, ',.0f')} |")
    return "\n".join(out)


def _ratio_cells(study: str, path: str, models: list[str] | None = None) -> dict:
    """variant -> batch -> [(prompt, ratio, verdict)] against fp16 on the same engine and GPU (of `models`, or
    every model)."""
    df = rows(study)
    out: dict = {}
    for model in models or df.model.dropna().unique():
        every = df[df.model == model]
        d = newest_per_cell(every)
        for c in speed.crossover(d, report_baseline(d), every):
            if c["decode"] != path:
                continue
            for (b, p), v in c["verdicts"].items():
                out.setdefault(c["precision"], {}).setdefault(b, []).append((p, c["ratios"].get((b, p)), v))
    return out


def ratios(study: str, path: str, models: list[str] | None = None) -> str:
    """Decode ms/token over fp16's per batch (the range over prompts 128, 1024, 4064), where both ran on one GPU;
    the verdict by the report's speed rule."""
    cells = _ratio_cells(study, path, models)
    batches = sorted({b for v in cells.values() for b in v})
    out = ["| " + " | ".join(["variant"] + [f"batch {b}" for b in batches]) + " |", "|---" * (len(batches) + 1) + "|"]
    for variant, by_batch in sorted(cells.items()):
        line = [variant]
        for b in batches:
            got = [(p, r, v) for p, r, v in by_batch.get(b, []) if r is not None]
            if not got:
                line.append("–")
                continue
            rs = [r for _, r, _ in got]
            verdicts = {v for _, _, v in got}
            word = ("faster" if verdicts == {"faster"} else "slower" if verdicts == {"slower"} else
                    "as fast" if verdicts == {"even"} else "no claim" if verdicts <= {"noisy", "drifted", "unknown"}
                    else "mixed")
            span = f"{min(rs):.2f}×" if max(rs) - min(rs) < 0.005 else f"{min(rs):.2f}–{max(rs):.2f}×"
            line.append(f"{span} {word}")
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def fits() -> str:
    """The largest batch at 4096 tokens that fits each budget, by the memory model fitted to the 7B's eager cells
    (reserved bytes, the default allocator)."""
    df = rows("operating-point-7b")
    d = newest_per_cell(df)
    d = d[d["cuda_alloc_conf"].fillna("") == ""] if "cuda_alloc_conf" in d else d  # the default allocator
    variants = sorted(set(d.variant))
    budgets = [("16 GiB", 16 * fit.GiB), ("24 GiB", 24 * fit.GiB), ("80 GiB", 80 * fit.GiB)]
    made = {f["label"]: f for f in fit.fits(d, variants, budgets) if f["context"] == 4096}
    shown = [v for v in variants if any(v in f["batches"] for f in made.values())]
    out = ["| budget | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for label, _ in budgets:
        f = made.get(label)
        out.append(f"| {label} | " + " | ".join(
            (str(f["batches"][v]) if f["batches"][v] else "no") if f and v in f["batches"] else "–" for v in shown)
            + " |")
    return "\n".join(out)


def energy() -> str:
    """Joules per decode token of the 7B, eager, at 4064 × 32, with the counter's bound."""
    d = newest_per_cell(rows("operating-point-7b"))
    d = d[(d.decode == "eager") & (d.prompt_tokens == 4064) & (d.batch_size == 32) & (d.status == "ok")]
    out = ["| variant | J / decode token | J / prompt token | mean power W |", "|---|---|---|---|"]
    for _, r in d.sort_values("variant").iterrows():
        j, bound = r.get("energy_j_per_decode_token"), r.get("decode_energy_bound")
        shown = "withheld (decode under a fifth of the window's energy, or bound over ±25%)" if j != j or j is None \
            else f"{j:.3g} ±{bound:.0%}" if bound == bound and bound is not None else f"{j:.3g}"
        pj = r.get("energy_j_per_prefill_token")
        out.append(f"| {r.variant} | {shown} | {'–' if pj != pj or pj is None else format(pj, '.3g')} | "
                   f"{r.get('power_mean_w', float('nan')):.0f} |")
    return "\n".join(out)


def scaling() -> str:
    study = json.loads((STUDIES / "sweep-scaling" / "study.json").read_text())
    walls = {}
    for s in study["sources"]:
        gpus = len(s["gpus"]) or 1
        walls[gpus] = s["wall_s"]
    one = walls.get(1)
    out = ["| GPUs | sweep wall time | speed-up |", "|---|---|---|"]
    for g in sorted(walls):
        out.append(f"| {g} | {walls[g]:.1f} s | {one / walls[g]:.2f}× |" if one else f"| {g} | {walls[g]:.1f} s | – |")
    return "\n".join(out)


def _engines_ran() -> bool:
    return (STUDIES / "vllm-vs-hf" / "cells.parquet").is_file()


def engines() -> str | None:
    """transformers against vLLM on one GPU: each method's decode ms/token over fp16's on its own engine, per batch,
    for the models measured for speed (those whose sweeps measured no quality)."""
    if not _engines_ran():
        return None
    d = rows("vllm-vs-hf")
    speed_models = [m for m in d.model.dropna().unique() if d[d.model == m].perplexity.isna().all()]
    return ratios("vllm-vs-hf", "compiled", speed_models)


def engines_quality() -> str | None:
    """SmolLM2's quality through both engines, and whether the engines agree: their distance at fp16 against the
    closest quantized variant's (this study's, else quality-smollm2's: transformers, the same windows)."""
    if not _engines_ran():
        return None
    entries, base = _entries("vllm-vs-hf")
    apart = decision.engines_apart(entries, base)
    if apart is None:  # no quantized variant's distance here
        other = [e for e in _entries("quality-smollm2")[0] if e["name"] != base]
        apart = decision.engines_apart(entries + other, base)
        apart = apart and apart.rstrip(".") + (" (the quantized variants' distances: "
                                               "[quality-smollm2](../studies/quality-smollm2), transformers, the same "
                                               "windows).")
    return quality("vllm-vs-hf") + "\n\n" + (apart or f"The engines' distance at {base} was not measured.")


def engines_bandwidth() -> str | None:
    """fp16 decode at batch 1 per engine and prompt: ms/token and the share of the GPU's memory bandwidth it reaches
    (the bytes a decode step reads over its time, against the datasheet's peak), on each GPU that measured it (cards
    of one model differ by a few percent: compare engines on one card)."""
    if not _engines_ran():
        return None
    d = rows("vllm-vs-hf")  # the study keeps each cell's newest row per GPU
    d = d[(d.precision == "fp16") & (d.batch_size == 1) & (d.status == "ok") & (d.decode == "compiled")
          & (d.kv_cache == "native")]
    out = ["| model | engine | prompt | decode ms/token [95%] | GB/s | of the GPU's peak | GPU |",
           "|---|---|---|---|---|---|---|"]
    for _, r in d.sort_values(["model", "engine", "prompt_tokens", "gpu_uuid"]).iterrows():
        out.append(f"| {r.model} | {r.engine} | {r.prompt_tokens} | {_ms(r)} | "
                   f"{r.achieved_bandwidth_gbs:,.0f} | {r.bandwidth_fraction:.1%} of {r.peak_bandwidth_gbs:,.0f} | "
                   f"{r.gpu_name} {str(r.gpu_uuid).removeprefix('GPU-')[:8]} |")
    return "\n".join(out)


def _ms(r) -> str:
    return f"{r.decode_ms_per_token:.3f} {_ci(r.get('decode_ms_ci_low'), r.get('decode_ms_ci_high'), '{:.3f}')}"


def engines_kv() -> str | None:
    """vLLM's fp8 KV cache beside its native one, fp16 weights, compiled: decode ms/token and the KV bytes the
    cell's requests hold, per prompt and batch (None until the study has fp8 KV rows)."""
    if not _engines_ran():
        return None
    d = rows("vllm-vs-hf")  # each cell's newest row per GPU: its native twin is looked up on the same GPU
    d = d[(d.precision == "fp16") & (d.engine == "vllm") & (d.status == "ok") & (d.decode == "compiled")]
    fp8 = d[d.kv_cache == "fp8"]
    if fp8.empty:
        return None
    out = ["| model | prompt | batch | native ms/token [95%] | fp8 ms/token [95%] | fp8 / native | KV MB native → fp8 "
           "| GPU |", "|---|---|---|---|---|---|---|---|"]
    for _, r in fp8.sort_values(["model", "prompt_tokens", "batch_size"]).iterrows():
        same = d[(d.kv_cache == "native") & (d.model == r.model) & (d.prompt_tokens == r.prompt_tokens)
                 & (d.batch_size == r.batch_size) & (d.new_tokens == r.new_tokens) & (d.gpu_uuid == r.gpu_uuid)]
        if same.empty:
            continue
        n = same.iloc[0]
        out.append(f"| {r.model} | {r.prompt_tokens} | {r.batch_size} | {_ms(n)} | {_ms(r)} | "
                   f"{r.decode_ms_per_token / n.decode_ms_per_token:.2f}× | "
                   f"{n.kv_cache_bytes / 1e6:,.0f} → {r.kv_cache_bytes / 1e6:,.0f} | {r.gpu_name} |")
    return "\n".join(out)


TABLES = {"quality": quality, "ratios-7b-compiled": lambda: ratios("operating-point-7b", "compiled"),
          "ratios-7b-eager": lambda: ratios("operating-point-7b", "eager"),
          "ratios-smollm2-compiled": lambda: ratios("operating-point-smollm2", "compiled"),
          "fits-7b": fits, "energy-7b": energy, "scaling": scaling, "engines": engines,
          "engines-quality": engines_quality, "engines-bandwidth": engines_bandwidth, "engines-kv": engines_kv}


def render_all() -> dict[str, str]:
    return {name: make() for name, make in TABLES.items() if make() is not None}


def write(page: str, tables: dict[str, str]) -> str:
    for name, text in tables.items():
        page = re.sub(rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)",
                      lambda m: m.group(1) + text + "\n" + m.group(2), page, flags=re.S)
    return page


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    tables = render_all()
    if args.write:
        PAGE.write_text(write(PAGE.read_text(), tables))
    else:
        for name, text in tables.items():
            print(f"<!-- table:{name} -->\n{text}\n<!-- /table:{name} -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
