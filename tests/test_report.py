"""The report decides: on hand-made rows, the entries with log-scale intervals and quality states, the picks of the
decision (each with its evidence, none beyond what was measured), the speed rule (one machine, no noise, an interval
beyond 1 and the pace's drift), the crossover, the caveats as rules, the migration of older rows, the fit; golden
reports for shapes a sweep can have (compiled only at batches 8 and 32, merged with gaps, one precision, synthetic
weights); and in headless Chromium every published study and a quickstart-like sweep at 1400 px."""
import json
import math
import os
import random
import re
import shutil
from datetime import datetime, timedelta, timezone
from html import unescape
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.store import Store
from reports import caveats, charts, decision, fit, migrate, speed, summary, tables
from reports.build import render
from reports.data import colors, newest_per_cell, pareto, read_results, report_baseline
from tests.conftest import ROOT

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)


def row(model, precision, n, b, prompt=32, decode="eager", **kw):
    base = dict(cell_key=f"{model}-{precision}-{prompt}-{n}-{b}-{decode}", sweep="hand", run_id="r1", model=model,
                precision=precision, baseline="fp16", precision_name=precision.split("(")[0], precision_options="{}",
                prompt_tokens=prompt, new_tokens=n, batch_size=b, decode=decode, kv_cache="native", status="ok",
                started_at=T0.isoformat(), ended_at=(T0 + timedelta(seconds=90)).isoformat(), device="cuda",
                gpu_name="NVIDIA H100 80GB HBM3", gpu_uuid="GPU-a", host="h1", noisy_timing=False,
                gpu_memory_bytes=80 * 2 ** 30)
    return {**base, **kw}


def timing(ms: float, runs: int, n: int, jitter: float = 0.0, seed: int = 0) -> dict:
    """Decode samples of `runs` runs of n tokens around `ms`, and the columns the worker derives from them."""
    rng = random.Random(seed)
    means = [ms * (1 + rng.uniform(-jitter, jitter)) for _ in range(runs)]
    samples = [m for m in means for _ in range(n - 1)]
    from common.stats import mean_interval, relative_halfwidth

    _, lo, hi = mean_interval(means)
    return {"decode_ms_per_token": sum(means) / runs, "decode_ms_samples": samples, "decode_ms_ci_low": lo,
            "decode_ms_ci_high": hi, "decode_ci_rel_halfwidth": relative_halfwidth(means), "repeats_done": runs,
            "cv_decode": jitter / 2, "decode_tokens_per_s": 1000 / ms}


def quality(ppl: float, base_ppl: float, spread: float, windows: int = 20, kl: float | None = None) -> dict:
    """Window losses around ln(ppl) (2047 tokens each), the paired interval against the baseline's windows."""
    rng = random.Random(1)
    base = [math.log(base_ppl) * 2047 * (1 + rng.uniform(-0.05, 0.05)) for _ in range(windows)]
    shift = math.log(ppl / base_ppl) * 2047
    mine = [b + shift + rng.uniform(-spread, spread) * 2047 for b in base]
    from common.stats import paired_log_ratio, perplexity_interval

    p = math.exp(sum(mine) / (2047 * windows))
    _, lo, hi = perplexity_interval(mine, [2047] * windows) or (p, None, None)
    _, llo, lhi = paired_log_ratio(mine, base, [2047] * windows) or (None, None, None)
    out = {"perplexity": p, "ppl_ci_low": lo, "ppl_ci_high": hi, "ppl_window_nll": mine,
           "ppl_window_tokens": [2047] * windows, "ppl_windows": windows, "ln_ppl_ratio_ci_low": llo,
           "ln_ppl_ratio_ci_high": lhi, "ln_ppl_ratio": math.log(p / base_ppl)}
    if kl is not None:
        out.update(kl_mean=kl, kl_p99=kl * 10, top1_agreement=1 - kl)
    return out, base


def memory(weights: float, kv_per_token: float, act_per_token: float, b: int, prompt: int, n: int) -> dict:
    context = prompt + n
    kv = kv_per_token * context * b
    return {"weights_bytes": weights, "weights_allocated_bytes": weights, "kv_bytes_per_token": kv_per_token,
            "kv_cache_bytes": kv, "memory_before_bytes": weights, "peak_bytes": weights + kv + act_per_token * context * b,
            "prefill_peak_bytes": weights + kv + act_per_token * context * b, "decode_peak_bytes": weights + kv}


def model_rows(model="m", precisions=None, prompts=(128, 1024), batches=(1, 8), n=64) -> list[dict]:
    """A model: fp16 (baseline) and others; every precision eager and compiled over prompts × batches."""
    precisions = precisions or {"fp16": (10.0, 1.0, 0.0), "nf4": (7.0, 0.27, 0.02), "int8": (12.0, 0.52, 0.0001)}
    base_q, base_nll = quality(20.0, 20.0, 0.0)
    out = []
    for p, (ms, size, kl) in precisions.items():
        q = base_q if p == "fp16" else quality(20.0 * (1 + 5 * kl), 20.0, 0.01, kl=kl)[0]
        if p == "fp16":
            q = {**q, "kl_mean": 0.0, "top1_agreement": 1.0, "ppl_window_nll": base_nll,
                 "ln_ppl_ratio_ci_low": 0.0, "ln_ppl_ratio_ci_high": 0.0}
        for prompt in prompts:
            for b in batches:
                for decode, factor in (("eager", 1.0), ("compiled", 0.2)):
                    t = timing(ms * factor * (1 + prompt / 4096) * (1 + b / 32), 8, n, jitter=0.01, seed=hash(p) % 97)
                    out.append(row(model, p, n, b, prompt, decode, **q, **t, ttft_ms=ms * prompt / 100,
                                   **memory(2e9 * size, 50_000, 20_000, b, prompt, n), bits_per_param=16 * size,
                                   quant_scheme="none" if p == "fp16" else "weight-only",
                                   weight_bits_nominal=16 if p == "fp16" else 4 if "4" in p else 8,
                                   energy_j_per_decode_token=0.3 * size + 0.1, power_mean_w=400.0))
    return out


@pytest.fixture
def results(tmp_path):
    out = tmp_path / "sweep"
    store = Store(out, "r1")
    for r in model_rows():
        store.write(r)
    return out


def entries_of(folder, budget=None):
    df = read_results([folder])
    cell = summary.headline_cell(df)
    return df, cell, {e["precision"]: e for e in summary.entries(df, "fp16", cell, budget)}


def write(folder, rows, run_id="r1"):
    store = Store(folder, run_id)
    for r in rows:
        store.write(r)
    return folder


@pytest.fixture
def no_charts(monkeypatch):
    """Reports rendered for their text alone: drawing the SVG charts is most of a render's time."""
    for name in ("quality", "decode_vs_length", "prompt_length", "memory", "energy", "crossover"):
        monkeypatch.setattr(charts, name, lambda *a, **k: None)


def decision_text(html: str) -> str:
    d = html[html.index('<div class="decision">'):html.index("<b>Terms.</b>")]
    return unescape(re.sub(r"<[^>]+>", " ", d))


# --------------------------------------------------------------------------------------------- intervals, states

def test_intervals_are_positive_and_need_three_samples():
    from common.stats import MIN_SAMPLES, mean_interval, perplexity_interval, relative_halfwidth

    assert MIN_SAMPLES == 3 and mean_interval([1.0, 200.0]) is None  # two runs: no interval, not -400 to 600
    m, lo, hi = mean_interval([1.0, 50.0, 200.0])
    assert m == pytest.approx(83.67, rel=1e-3) and 0 < lo < m < hi
    assert math.log(m / lo) == pytest.approx(math.log(hi / m))  # symmetric on the log scale
    assert relative_halfwidth([10.0, 10.0, 10.0]) == 0.0
    assert perplexity_interval([10.0, 12.0], [5, 5]) is None
    rows = pd.DataFrame([row("m", "fp16", 8, 1, decode_ms_samples=[1.0] * 7 + [200.0] * 7, new_tokens=8),
                         row("m", "fp16", 8, 2, decode_ms_samples=[1.0] * 7 + [50.0] * 7 + [200.0] * 7,
                             decode_ms_ci_low=-417.7)])  # a row written with a linear interval below zero
    up = migrate.upgrade(rows)
    assert pd.isna(up.decode_ms_ci_low.iloc[0]) and up.decode_ms_ci_low.iloc[1] > 0


def test_entries_quality_states_against_the_budget(tmp_path):
    """≈ baseline needs the paired interval within ±the budget; holding 0 with a wider interval is "not resolved";
    fewer than 3 windows give no interval at all."""
    rows = model_rows(prompts=(128,), batches=(1,))
    q_narrow, _ = quality(20.02, 20.0, 0.0005)
    q_wide, _ = quality(20.1, 20.0, 0.2, windows=4)
    q_two, _ = quality(20.5, 20.0, 0.01, windows=2)
    for r in rows:
        if r["precision"] == "nf4":
            r.update(q_wide, kl_mean=0.02)
        if r["precision"] == "int8":
            r.update(q_narrow, kl_mean=0.001)
    df, cell, by = entries_of(write(tmp_path / "a", rows))
    assert by["int8"]["quality_state"] == "≈ baseline" and by["nf4"]["quality_state"] == "not resolved"
    for r in rows:
        if r["precision"] == "nf4":
            r.update(q_two, ln_ppl_ratio_ci_low=None, ln_ppl_ratio_ci_high=None)
    df, cell, by = entries_of(write(tmp_path / "b", rows))
    assert by["nf4"]["quality_state"] == "too few windows" and by["nf4"]["ppl_ci"] == (None, None)
    html = render([tmp_path / "b"], tmp_path / "r.html")[0].read_text()
    assert "too few windows" in html


# --------------------------------------------------------------------------------------------------- decision

def test_the_decision_picks_with_evidence_and_says_what_to_avoid(tmp_path, no_charts):
    precisions = {"fp16": (10.0, 1.0, 0.0), "nf4": (7.0, 0.27, 0.02), "int8": (12.0, 0.52, 0.004),
                  "fp4": (7.5, 0.27, 0.05), "quanto-int2": (20.0, 0.14, 2.0)}
    rows = model_rows(precisions=precisions)
    for r in rows:
        if r["precision"] == "quanto-int2":
            r["perplexity"] = 4e6
    html = render([write(tmp_path / "s", rows)], tmp_path / "r.html")[0].read_text()
    text = decision_text(html)
    assert "Closest to fp16 at ≤ 8 bits: int8 (KL 0.004" in text
    assert "Closest to fp16 at ≤ 4 bits: nf4 (KL 0.02" in text
    assert "Smallest within the quality budget (KL ≤ 0.02): nf4" in text and "3.7× smaller" in text
    assert re.search(r"Fastest eager decode at batch 1: nf4, 0\.\d\d(–0\.\d\d)?× fp16's ms/token at prompts 128, "
                     r"1024 \(95% interval 0\.\d\d–0\.\d\d×\)", text)
    assert "Avoid: Broken" in text and "quanto-int2" in text
    assert "fp4: dominated by nf4" in text  # further from fp16, slower, no smaller


def test_no_pick_without_evidence_and_what_to_run(tmp_path, no_charts):
    rows = model_rows(prompts=(128,), batches=(1,))
    for r in rows:
        if r["precision"] == "nf4":
            r.update(timing(7.0, 8, 64, jitter=0.5, seed=3))  # ±50% between runs
        if r["precision"] == "int8":
            r.update(gpu_uuid="GPU-b", host="h2")
    html = render([write(tmp_path / "s", rows)], tmp_path / "r.html")[0].read_text()
    text = decision_text(html)
    assert "Fastest" not in text.split("What the data")[0]
    assert "No eager speed claim against fp16 at batch 1 for nf4: timing too noisy" in text
    assert "No eager speed claim against fp16 at batch 1 for int8: measured on another GPU or host" in text
    assert "generation.repeats: auto" in text


def test_memory_picks_cite_measured_batches_only(tmp_path, no_charts):
    rows = model_rows(prompts=(128, 1024), batches=(1, 8))
    df = read_results([write(tmp_path / "s", rows)])
    entries = summary.entries(df, "fp16", summary.headline_cell(df))
    fits = fit.fits(df, [e["precision"] for e in entries], [("5 GB", 5e9), ("80 GiB", 80 * fit.GiB)])
    picks = decision._memory(entries, fits)
    room, per = 5e9 - fit.RESERVE - 2e9, (1024 + 64) * (50_000 + 20_000)
    assert math.floor(room / per) == 25  # within 4× the largest batch measured (8): cited
    assert any(p.startswith("For 5 GB at 1088 tokens: fp16 (the baseline itself fits; up to batch 25") for p in picks)
    far = [p for p in picks if p.startswith("For 80 GiB")]
    assert far and "memory model's prediction" in far[0] and not re.search(r"\d{3,}", far[0].split("(")[1])
    table = tables.fit_table(fits, entries, decision.EXTRAPOLATED)
    starred = [c for r in table["rows"] for c in r["cells"] if c["far"]]
    assert starred and all("--set generation.batch_sizes=[" in c["command"] for c in starred)


def test_the_engines_distance_against_the_closest_quantized_one(tmp_path):
    rows = model_rows(prompts=(128,), batches=(1,))
    vllm = [dict(r, engine="vllm", cell_key=r["cell_key"] + "-v") for r in rows if r["precision"] == "fp16"]
    for r in vllm:
        r.update(kl_mean=0.000001, top1_agreement=0.998)
    df = read_results([write(tmp_path / "s", rows + vllm)])
    entries = summary.entries(df, "fp16", summary.headline_cell(df))
    assert "fp16 · vLLM" in [e["precision"] for e in entries]
    assert decision.engines_apart(entries, "fp16").startswith("The engines agree: KL(fp16 ‖ fp16 · vLLM) is 1e-06")
    fp32 = dict(next(e for e in entries if e["precision"] == "fp16"), precision="fp32", name="fp32", kl_mean=2e-7)
    assert decision.engines_apart(entries + [fp32], "fp16").startswith("The engines agree"), "fp32 is not quantized"
    for e in entries:
        if e["precision"] == "fp16 · vLLM":
            e["kl_mean"] = 0.005
    assert decision.engines_apart(entries, "fp16").startswith("The engines disagree")


def test_the_baseline_on_another_engine_is_not_a_pick(tmp_path):
    """fp16 through vLLM is within any quality budget of fp16 through transformers and no smaller: not a choice of
    quantization, so the decision neither picks it as the smallest within budget nor as the closest."""
    rows = [r for r in model_rows(prompts=(128,), batches=(1,)) if r["precision"] == "fp16"]
    vllm = [dict(r, engine="vllm", cell_key=r["cell_key"] + "-v", kl_mean=3e-5, top1_agreement=0.997,
                 weights_bytes=r["weights_bytes"] + 10**6) for r in rows]
    df = read_results([write(tmp_path / "s", rows + vllm)])
    entries = summary.entries(df, "fp16", summary.headline_cell(df))
    picks = decision.decide(entries, "fp16", df, [], summary.QUALITY_BUDGET, [])["picks"]
    assert not any("fp16 · vLLM" in p for p in picks), picks


def test_each_engine_has_its_own_closest_pick(tmp_path):
    """Served by one engine, a user chooses among its variants: with two engines the closest at each bit width is
    named per engine, transformers (the baseline's) first."""
    rows = model_rows(prompts=(128,), batches=(1,))
    vllm = [dict(r, engine="vllm", cell_key=r["cell_key"] + "-v") for r in rows]
    for r in vllm:
        r.update(kl_mean={"fp16": 3e-5, "int8": 0.01, "nf4": 0.015}[r["precision"]])
    df = read_results([write(tmp_path / "s", rows + vllm)])
    entries = summary.entries(df, "fp16", summary.headline_cell(df))
    picks = [p for p in decision.decide(entries, "fp16", df, [], summary.QUALITY_BUDGET, [])["picks"]
             if p.startswith("Closest")]
    assert [p.split(" (")[0] for p in picks] == [
        "Closest to fp16 at ≤ 8 bits through transformers: int8",
        "Closest to fp16 at ≤ 4 bits through transformers: nf4",
        "Closest to fp16 at ≤ 8 bits through vLLM: int8 · vLLM",
        "Closest to fp16 at ≤ 4 bits through vLLM: nf4 · vLLM"]


def test_one_engine_without_its_baseline_names_no_engine(tmp_path):
    """A report of vLLM rows alone, its baseline not among them, has one engine: its picks say no "through"."""
    rows = [dict(r, engine="vllm", cell_key=r["cell_key"] + "-v", kl_mean={"int8": 0.01, "nf4": 0.015}[r["precision"]])
            for r in model_rows(prompts=(128,), batches=(1,)) if r["precision"] != "fp16"]
    df = read_results([write(tmp_path / "s", rows)])
    entries = summary.entries(df, "fp16", summary.headline_cell(df))
    picks = [p for p in decision.decide(entries, "fp16", df, [], summary.QUALITY_BUDGET, [])["picks"]
             if p.startswith("Closest")]
    assert [p.split(" (")[0] for p in picks] == ["Closest to fp16 at ≤ 8 bits: int8 · vLLM",
                                                 "Closest to fp16 at ≤ 4 bits: nf4 · vLLM"]


# ------------------------------------------------------------------------------------------------ the speed rule

def test_crossover_over_batch_and_prompt(tmp_path):
    df = read_results([write(tmp_path / "s", model_rows())])
    maps = {(m["precision"], m["decode"]): m for m in speed.crossover(df, "fp16")}
    m = maps[("nf4", "eager")]
    assert m["batches"] == [1, 8] and m["prompts"] == [128, 1024] and m["against"] == "fp16"
    assert all(v == pytest.approx(0.7, rel=0.05) for v in m["ratios"].values())
    assert maps[("int8", "compiled")]["ratios"][(8, 1024)] == pytest.approx(1.2, rel=0.05)


def test_offline_throughput_against_its_engines_baseline(tmp_path, no_charts):
    """fp16 on hf and vLLM, nf4 on vLLM, 64 × (512 + 128): nf4's ratio is against vLLM's fp16 (same requests, same
    GPU), vLLM's fp16 against nothing (it is its engine's baseline); a unit without the figure has no line."""
    seconds = {("fp16", "hf"): [4.0, 4.1, 3.9], ("fp16", "vllm"): [2.0, 2.02, 1.98], ("nf4", "vllm"): [1.6, 1.61, 1.59]}
    rows = []
    for (p, engine), s in seconds.items():
        for b in (1, 8):
            rows.append(row("m", p, 64, b, engine=engine, cell_key=f"{p}-{engine}-{b}", **timing(10, 5, 64),
                            throughput_s_samples=s, throughput_tokens_per_s=64 * 128 / (sum(s) / 3),
                            throughput_ci_low=64 * 128 / max(s), throughput_ci_high=64 * 128 / min(s),
                            throughput_requests=64, throughput_prompt_tokens=512, throughput_new_tokens=128,
                            throughput_decode="compiled"))
    rows.append(row("m", "int8", 64, 1, engine="hf", cell_key="int8", **timing(10, 5, 64)))
    df = newest_per_cell(read_results([write(tmp_path / "s", rows)]))
    by = {t["variant"]: t for t in speed.throughput(df, "fp16")}
    assert set(by) == {"fp16", "fp16 · vLLM", "nf4 · vLLM"}
    assert by["nf4 · vLLM"]["versus"] == "fp16 · vLLM" and by["nf4 · vLLM"]["verdict"] == "faster"
    assert by["nf4 · vLLM"]["ratio"][0] == pytest.approx(2.0 / 1.6, rel=1e-3)
    assert by["nf4 · vLLM"]["ratio"][1] < 1.25 < by["nf4 · vLLM"]["ratio"][2]
    assert by["fp16 · vLLM"]["ratio"] is None and by["fp16"]["ratio"] is None
    html = render([tmp_path / "s"], tmp_path / "r.html")[0].read_text()
    assert "Offline throughput" in html and "64 × (512 prompt + 128 new), compiled" in html
    assert "1.25× [" in html


def test_where_quantization_pays_in_words():
    nf4 = {(1, 128): 7.0, (1, 1024): 7.5, (8, 128): 10.0, (8, 1024): 14.0, (8, 4064): 15.0, (32, 128): 20.0}
    rows = []
    for (b, p), ms in nf4.items():
        rows.append(row("m", "fp16", 32, b, prompt=p, **timing(10.0, 5, 32, jitter=0.02, seed=b + p)))
        rows.append(row("m", "nf4", 32, b, prompt=p, **timing(ms, 5, 32, jitter=0.3 if p == 4064 else 0.02,
                                                               seed=b * p),
                        **({"gpu_uuid": "GPU-b"} if b == 32 else {})))
    rows.append(row("m", "nf4", 32, 1, prompt=128, run_id="r0", cell_key="older", **timing(30.0, 5, 32)))
    df = migrate.upgrade(pd.DataFrame(rows)).assign(variant=lambda d: d.precision)
    (c,) = speed.crossover(newest_per_cell(df), "fp16")
    assert c["ratios"][(1, 128)] == pytest.approx(0.7, rel=0.03)  # the newer of two rows of one batch and prompt
    assert c["verdicts"] == {(1, 128): "faster", (1, 1024): "faster", (8, 128): "even", (8, 1024): "slower",
                             (8, 4064): "noisy", (32, 128): "other-machine"}
    assert (32, 128) not in c["ratios"]  # across machines: no ratio at all
    assert speed.where_it_pays([c]) == [
        "nf4, eager decode against fp16: faster at batch 1 (2 cells); at batch 8 within noise of it at prompt 128, "
        "slower at prompt 1024, noisy timing at prompt 4064; 1 cell against fp16 on another GPU or host: no verdict."]


def test_the_baseline_on_the_variants_own_machine_is_found_among_every_row():
    """A study keeps each machine's newest row of a cell: a variant measured on machine B is compared with the
    baseline's row from B, though the baseline's newest row ran on A."""
    rows = [row("m", "fp16", 32, 1, **timing(10.0, 5, 32, jitter=0.01), gpu_uuid="GPU-b", run_id="r1", cell_key="x"),
            row("m", "fp16", 32, 1, **timing(12.0, 5, 32, jitter=0.01), gpu_uuid="GPU-a", run_id="r2", cell_key="x"),
            row("m", "nf4", 32, 1, **timing(8.0, 5, 32, jitter=0.01), gpu_uuid="GPU-b", run_id="r1", cell_key="y")]
    every = migrate.upgrade(pd.DataFrame(rows)).assign(variant=lambda d: d.precision)
    (c,) = speed.crossover(newest_per_cell(every), "fp16", every)
    assert c["verdicts"] == {(1, 32): "faster"} and c["ratios"][(1, 32)] == pytest.approx(0.8, rel=0.02)


def test_a_pace_that_moved_between_cells_widens_what_counts():
    fp16 = {(1, 128): 20.0, (1, 1024): 10.0, (1, 4064): 10.5, (8, 128): 21.0}
    nf4 = {(1, 128): 16.0, (1, 1024): 25.0, (1, 4064): 10.5, (8, 128): 18.0}
    rows = [row("m", p, 32, b, prompt=q, **timing(ms, 5, 32, jitter=0.01, seed=b + q + len(p)))
            for p, cells in (("fp16", fp16), ("nf4", nf4)) for (b, q), ms in cells.items()]
    df = migrate.upgrade(pd.DataFrame(rows)).assign(variant=lambda d: d.precision)
    assert speed.pace_drift(df[df.variant == "fp16"].set_index(["batch_size", "prompt_tokens"])) == pytest.approx(
        2.0, rel=0.02)
    (c,) = speed.crossover(df, "fp16")
    assert c["drift"] == pytest.approx(2.0 * 25.0 / 10.5, rel=0.03)
    assert c["verdicts"] == {(1, 128): "drifted", (1, 1024): "drifted", (1, 4064): "even", (8, 128): "drifted"}
    (words,) = speed.where_it_pays([c])
    assert "within the pace's drift" in words and "moved between cells by up to 4.7" in words


# ------------------------------------------------------------------------------------------ golden report shapes

def golden(tmp_path, rows, every_row=False, **kw):
    folder = write(tmp_path / "g", rows)
    html = render([folder], tmp_path / "g.html", every_row=every_row)[0].read_text()
    main = html[html.index('<table class="main'):html.index("</table>", html.index('<table class="main'))]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", main, re.S)
    figures = [re.sub(r"<[^>]+>", "", c).strip() for c in cells]
    text = decision_text(html)
    assert re.search(r"<li>\S", html[html.index('<div class="decision">'):]), "an empty decision"
    assert sum(f not in ("–", "") for f in figures) > len(figures) / 3, figures  # not a table of dashes
    return html, text


def test_golden_compiled_only_at_batches_8_and_32(tmp_path, no_charts):
    rows = [r for r in model_rows(batches=(8, 32)) if r["decode"] == "compiled"]
    html, text = golden(tmp_path, rows)
    assert "at 128+64 tokens, batch 8" in html
    assert "compiled decode at batch 8" in text or "At batch 8, compiled" in text


def test_golden_merged_with_gaps(tmp_path, no_charts):
    a = [r for r in model_rows(batches=(1,)) if r["precision"] != "int8"]
    b = [dict(r, sweep="other", run_id="r2", cell_key=r["cell_key"] + "b") for r in model_rows(batches=(8,))
         if r["precision"] == "int8"]
    html, text = golden(tmp_path, a + b, every_row=True)
    assert "int8" in html and "Closest to fp16" in text


def test_golden_one_precision(tmp_path, no_charts):
    rows = [r for r in model_rows() if r["precision"] == "fp16"]
    html, text = golden(tmp_path, rows)
    assert "For this NVIDIA H100 80GB HBM3" in text


def test_golden_synthetic_weights_without_quality(tmp_path, no_charts):
    keep = ("perplexity", "ppl_", "kl_", "top1", "ln_ppl")
    rows = [{k: v for k, v in r.items() if not k.startswith(keep)} for r in model_rows()]
    html, text = golden(tmp_path, rows)
    assert "No quality is measured for this model" in text and "Fastest" in text


# ---------------------------------------------------------------------------------------------------- caveats

def test_caveats_are_rules_over_the_rows(tmp_path):
    rows = model_rows(prompts=(128,), batches=(1,))
    for r in rows:
        if r["precision"] == "nf4" and r["decode"] == "compiled":
            r.update(decode_host_ms_per_token=r["decode_ms_per_token"] * 0.95)
        if r["precision"] == "int8" and r["decode"] == "eager":
            r.update(host_other_busy_cpus_max=2.0, host_cpus=2)
    df = read_results([write(tmp_path / "s", rows)])
    found = caveats.caveats(df)
    assert any("decoded host-bound" in c and "m × nf4 compiled" in c for c in found)
    assert any("other processes kept at least 50%" in c and "m × int8 eager" in c for c in found)
    assert all(isinstance(r, caveats.Rule) for r in caveats.RULES)


def test_decode_energy_is_withheld_with_its_reason(tmp_path):
    rows = model_rows(prompts=(128,), batches=(1,))
    for r in rows:
        r.update(energy_runs=8, energy_window_j=100.0, energy_j_per_decode_token=0.3,
                 energy_j_per_decode_token_bound=0.03)
        if r["precision"] == "nf4":
            r.update(energy_window_j=5000.0)  # decode a sliver of the window's energy
        if r["precision"] == "int8":
            r.update(energy_j_per_decode_token_bound=0.15)  # ±50%
    html = unescape(render([write(tmp_path / "s", rows)], tmp_path / "r.html")[0].read_text())
    assert "have no joules per decode token: decode's energy is" in html
    assert "have no joules per decode token: NVML's energy counter" in html
    assert "0.3 ±10%" in html


# ------------------------------------------------------------------------------------------------- migration

def test_rows_of_every_older_schema_and_version_are_upgraded_in_one_place():
    schema1 = {"cell_key": "a", "status": "ok", "model": "m", "precision": "int8", "precision_name": "int8",
               "new_tokens": 8, "batch_size": 1, "measurement_version": 1}
    eager2 = dict(schema1, cell_key="b", precision="fp16", precision_name="fp16", decode="eager",
                  measurement_version=2, quant_scheme="none", weight_bits_nominal=16.0)
    compiled3 = dict(eager2, cell_key="c", decode="compiled", measurement_version=3)
    current = dict(eager2, cell_key="d", measurement_version=3, memory_measured_in="the last warm-up run")
    before_window = dict(current, cell_key="e", energy_j_per_decode_token=0.5, energy_timed_j=40.0, repeats_done=2,
                         batch_size=1, new_tokens=21, timed_s=0.4, energy_prefill_s=1.0)
    up = migrate.upgrade(pd.DataFrame([schema1, eager2, compiled3, current, before_window])).set_index("cell_key")
    assert up.loc["a", "decode"] == "eager" and up.loc["a", "kv_cache"] == "native" and up.loc["a", "engine"] == "hf"
    assert up.loc["a", "prompt_tokens"] == 32 and up.loc["a", "quant_scheme"] == "weight+activation"  # LLM.int8
    assert up.loc["a", "memory_measured_in"] == "a run after the timed runs"
    assert "count one KV cache twice" in up.loc["a", "measurement_note"]
    assert "idle GPU" in up.loc["b", "measurement_note"] and "idle GPU" in up.loc["c", "measurement_note"]
    assert pd.isna(up.loc["d", "measurement_note"])
    share = 0.5 * 2 * 1 * 20 / 40.0  # decode's joules over the timed runs'
    bound = (0.1 / 0.4 + 0.1 / 1.0 * (1 - share)) / share
    assert up.loc["e", "energy_j_per_decode_token_bound"] == pytest.approx(bound * 0.5)
    for v in (1, 2):
        assert ("compiled", v) in migrate.NOTES and ("eager", v) in migrate.NOTES
    assert ("compiled", 3) in migrate.NOTES


# ---------------------------------------------------------------------------------------------------------- fit

def test_fit_arithmetic_by_hand():
    p = {"weights": 4e9, "kv_per_token": 131072.0, "workspace": 0.0, "activation_per_token": 10000.0}
    budget, context = 16 * fit.GiB, 4096
    by_hand = math.floor((budget - fit.RESERVE - 4e9) / (4096 * (131072 + 10000)))
    assert fit.largest_batch(p, context, budget) == by_hand == 20
    assert fit.largest_batch(p, context, 4e9) == 0
    assert fit.parse_size("16GiB") == 16 * 2 ** 30 and fit.parse_size("24GB") == 24e9
    blocks = dict(p, block_tokens=16, block_bytes=16 * 131072.0 * 1.5)  # a paged cache: whole blocks
    assert fit.sequence_bytes(blocks, 4097) == math.ceil(4097 / 16) * 16 * 131072.0 * 1.5 + 4097 * 10000.0


def test_fit_workspace_and_activations_from_a_line():
    tokens = [160, 8192, 32768, 131072]
    extra = [5e8 + 3000 * t for t in tokens]
    workspace, slope = fit.upper_line(tokens, extra)
    assert slope == pytest.approx(3000) and workspace == pytest.approx(5e8)


def test_fit_golden_h200_7b():
    """The published edge (studies/memory-fit-7b): the model of reserved bytes never predicts that fp16's batch 53
    fits the H200 at 4096 tokens under the default allocator (it ran out of memory there), and with expandable
    segments the allocator reserved within 1.5% of what it allocated and batch 53 ran."""
    df = read_results([ROOT / "studies" / "memory-fit-7b"])
    default = df[col_is(df, "cuda_alloc_conf", None)]
    expandable = df[col_is(df, "cuda_alloc_conf", "expandable_segments:True")]
    fp16 = default[(default.precision == "fp16")]
    assert (fp16[fp16.batch_size == 53].status == "oom").all()
    assert set(expandable.status) == {"ok"} and 53 in set(expandable.batch_size)
    assert (expandable.peak_reserved_bytes / expandable.peak_bytes).max() < 1.015


def col_is(df, name, value):
    s = df[name] if name in df else pd.Series([None] * len(df), index=df.index)
    return s.isna() if value is None else s == value


# ------------------------------------------------------------------------------------------- rendering, charts

def test_the_report_renders_every_section(tmp_path):
    rows = model_rows()
    for r in rows:
        if r["precision"] == "int8":
            r.update(quality(20.002, 20.0, 0.0001)[0], kl_mean=0.0001)
    html = render([write(tmp_path / "s", rows)], tmp_path / "r.html")[0].read_text()
    for text in ("Decision", "Closest to fp16", "What fits a GPU", "Prompt length", "Energy per decode token",
                 "Where quantization pays", "Faster or slower than the baseline", "Crossover",
                 "Quality against speed and size", "≈ baseline", "Terms.", "<title>"):
        assert text in html, text


def test_wall_time_is_what_the_command_printed(tmp_path):
    folder = write(tmp_path / "s", model_rows(prompts=(128,), batches=(1,)))
    (folder / "sweep.json").write_text(json.dumps({"wall_s": 419.8, "cell_keys": None}))
    h = tables.header(read_results([folder]), ["hand"], [folder])
    assert h["wall"] == "6 m 60 s" or h["wall"] == "7 m 00 s"
    assert tables.duration(25771) == "7 h 09 m 31 s" and tables.duration(42.26) == "42.3 s"
    other = write(tmp_path / "t", model_rows(prompts=(128,), batches=(1,)))
    (other / "sweep.json").write_text(json.dumps({"wall_s": 60.2}))
    assert tables.header(read_results([folder, other]), ["a", "b"], [folder, other])["wall"] == "8 m 00 s (2 sweeps)"


def test_cpu_rows_show_resident_memory_and_no_energy_chart(tmp_path):
    rows = [row("cpu-model", p, 8, 1, device="cpu", gpu_uuid=None, gpu_name=None, gpu_memory_bytes=None,
                weights_bytes=5e8 * size, peak_rss_bytes=2e9, **timing(80.0 * (1 + size), 5, 8), cpu_model="Some CPU",
                cpu_count=2, torch_threads=2, baseline="fp32") for p, size in (("fp32", 1.0), ("nf4", 0.2))]
    html = render([write(tmp_path / "s", rows)], tmp_path / "r.html")[0].read_text()
    assert "peak RSS MB (CPU)" in html and "Resident memory on CPU" in html and "resident set" in html
    assert "Energy per decode token" not in html


def test_charts_draw_noisy_grey_and_claims_only(tmp_path):
    rows = model_rows(prompts=(128, 1024), batches=(1, 8))
    for r in rows:
        if r["precision"] == "nf4" and r["decode"] == "eager":
            r.update(timing(7.0, 8, 64, jitter=0.5, seed=3))
    df = read_results([write(tmp_path / "s", rows)])
    cell = summary.headline_cell(df)
    entries = summary.entries(df, "fp16", cell)
    svg = charts.quality(entries, colors([e["precision"] for e in entries]), cell, "fp16")
    assert "hollow grey: noisy timing" in svg
    maps = speed.crossover(df, "fp16")
    heat = charts.crossover(maps)
    noisy = [m for m in maps if m["precision"] == "nf4" and m["decode"] == "eager"][0]
    assert set(noisy["verdicts"].values()) == {"noisy"} and "noisy timing" in heat


def test_pareto():
    assert pareto([(10, 30, "a"), (12, 25, "b"), (15, 26, "c"), (20, 24, "d")]) == ["a", "b", "d"]


def test_empty_sweep_renders(tmp_path):
    (tmp_path / "empty" / "cells").mkdir(parents=True)
    html = render([tmp_path / "empty"], tmp_path / "r.html")[0].read_text()
    assert "no cell has finished" in html


def test_merge_two_sweeps_and_self_contained(tmp_path):
    results = write(tmp_path / "s", model_rows(prompts=(128,), batches=(1,)))
    other = write(tmp_path / "o", [row("smollm2", "fp32", 64, 1, sweep="second", perplexity=20.0,
                                       weights_bytes=5e8, **timing(9.0, 5, 64), baseline="fp32")], "r2")
    html = render([results, other], tmp_path / "merged.html")[0].read_text()
    assert "hand + second" in html and "smollm2" in html
    assert re.findall(r"https?://(?!www\.w3\.org/)|src=\"//|@import|url\((?!#)", html) == []


def test_a_merged_report_compares_against_the_unquantized_baseline():
    int4 = [row("m", "int4", 32, b, prompt=128, baseline="int4", sweep="a", cell_key=f"a{b}") for b in (8, 32)]
    fp16 = [row("m", "fp16", 32, b, prompt=128, sweep="b", cell_key=f"b{b}") for b in (8, 32)]
    df = migrate.upgrade(pd.DataFrame(int4 + fp16)).assign(variant=lambda d: d.precision)
    assert report_baseline(df) == "fp16" and report_baseline(df[df.sweep == "a"]) == "int4"


# --------------------------------------------------------------------------------------------------- the browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
STUDIES = sorted(p for p in (ROOT / "studies").glob("*") if (p / "cells.parquet").is_file())

CHECKS = """() => {
  const out = {scroll: document.documentElement.scrollWidth, decision: [], overlaps: []};
  document.querySelectorAll('.decision ul li').forEach(li => out.decision.push(li.textContent.trim()));
  document.querySelectorAll('.chart svg').forEach((svg, i) => {
    const boxes = [...svg.querySelectorAll('text')].map(t => t.getBoundingClientRect())
      .filter(b => b.width > 0 && b.height > 0);
    for (let a = 0; a < boxes.length; a++) for (let b = a + 1; b < boxes.length; b++) {
      const x = Math.min(boxes[a].right, boxes[b].right) - Math.max(boxes[a].left, boxes[b].left);
      const y = Math.min(boxes[a].bottom, boxes[b].bottom) - Math.max(boxes[a].top, boxes[b].top);
      if (x > 2 && y > 2) out.overlaps.push([i, a, b]);
    }
  });
  return out;
}"""


def negative_bounds(text: str) -> list[str]:
    """Intervals printed with a bound below zero ("-417.7–1,263.4"): every interval the page prints low–high is of a
    positive quantity (a signed change prints "[+1.5, +2.0]" or "[-0.01 to +0.03]" instead)."""
    return re.findall(r"(?:^|[\s(\[])-\d[\d,]*\.\d+\s*–\s*-?\d[\d,]*\.\d+", text, re.M)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"), reason="Debian chromium not installed (.ci/run installs it)")
@pytest.mark.parametrize("study", STUDIES + ["quickstart-like"], ids=[p.name for p in STUDIES] + ["quickstart-like"])
def test_real_reports_in_headless_chromium(tmp_path, study):
    """Every published study, and a sweep shaped like the quickstart's (three precisions, two windows, two lengths,
    noisy CPU timing), rendered and read in Chromium at 1400 px: a decision with picks, no negative bound on a
    positive quantity in the page or the rows, no sideways scroll, no chart text on chart text; screenshots kept."""
    from playwright.sync_api import sync_playwright

    if study == "quickstart-like":
        rows = []
        for p, ms, size in (("fp32", 80.0, 1.0), ("nf4", 40.0, 0.2), ("int8", 200.0, 0.3)):
            q = quality(20.0 * (1 + size / 4), 20.0, 0.05, windows=2, kl=0.0 if p == "fp32" else size / 10)[0]
            for n in (8, 32):
                rows.append(row("smollm2-135m", p, n, 1, prompt=32, baseline="fp32", device="cpu", gpu_uuid=None,
                                gpu_name=None, gpu_memory_bytes=None, **q, **timing(ms, 3, n, jitter=0.4, seed=n),
                                weights_bytes=5e8 * size, peak_rss_bytes=2e9, quant_scheme="none" if p == "fp32"
                                else "weight-only", weight_bits_nominal=32 if p == "fp32" else 4 if p == "nf4" else 8))
        folder = write(tmp_path / "quickstart", rows)
    else:
        folder = study
    page_file, unreadable = render([folder], tmp_path / "report.html")
    assert unreadable == []
    df = read_results([folder])
    for name in ("decode_ms_ci_low", "ttft_ms_ci_low", "ppl_ci_low"):
        if name in df:
            assert (pd.to_numeric(df[name], errors="coerce").dropna() > 0).all(), name
    shots = Path(os.environ.get("REPORT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / f"{Path(str(folder)).name}.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_file.as_uri())
        found = page.evaluate(CHECKS)
        text = page.inner_text("body")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    print(f"screenshot kept: {shot}")
    assert errors == []
    assert found["scroll"] <= 1400, found["scroll"]
    assert found["decision"] and all(found["decision"]), found["decision"]
    assert found["overlaps"] == [], found["overlaps"][:5]
    assert negative_bounds(text) == [], negative_bounds(text)[:5]
    assert shot.stat().st_size > 20_000


@pytest.mark.parametrize("study", STUDIES, ids=[p.name for p in STUDIES])
def test_every_study_renders_with_one_command(tmp_path, no_charts, study):
    """`python -m orchestrator report studies/<study>`: every row readable, a decision with picks per model."""
    from orchestrator.cli import main

    assert main(["report", str(study), "-o", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "could not be read" not in html and html.count('<div class="decision">') >= 1
    assert re.search(r'<div class="decision">.*?<li>\S', html, re.S)
    meta = json.loads((study / "study.json").read_text())
    assert meta["question"] and meta["sources"] and all(s["command"].startswith("python -m orchestrator sweep")
                                                         for s in meta["sources"])


@pytest.mark.slow
def test_the_findings_page_holds_what_the_studies_give():
    """docs/findings.md's tables are made from the studies (studies/harness/findings.py): regenerating them changes
    nothing."""
    import sys

    sys.path.insert(0, str(ROOT / "studies" / "harness"))
    import findings

    page = (ROOT / "docs" / "findings.md").read_text()
    assert findings.write(page, findings.render_all()) == page, "run: python studies/harness/findings.py --write"


def test_the_findings_kv_table_pairs_fp8_with_native_on_one_gpu(monkeypatch):
    """vLLM's fp8 KV cache is set beside the native cache of the same cell on the same GPU, and only there."""
    import sys

    import pandas as pd

    sys.path.insert(0, str(ROOT / "studies" / "harness"))
    import findings

    def row(kv, ms, kv_bytes, gpu="G1"):
        return {"model": "m", "precision": "fp16", "engine": "vllm", "status": "ok", "decode": "compiled",
                "kv_cache": kv, "prompt_tokens": 1024, "batch_size": 8, "new_tokens": 128, "gpu_uuid": gpu,
                "gpu_name": "H", "decode_ms_per_token": ms, "decode_ms_ci_low": ms - 0.01,
                "decode_ms_ci_high": ms + 0.01, "kv_cache_bytes": kv_bytes}

    rows = pd.DataFrame([row("native", 8.0, 600e6), row("fp8", 7.2, 300e6),
                         row("fp8", 9.0, 1e6, gpu="G2")])  # no native beside it on G2
    monkeypatch.setattr(findings, "_engines_ran", lambda: True)
    monkeypatch.setattr(findings, "rows", lambda study: rows)
    lines = findings.engines_kv().splitlines()
    assert lines[2:] == ["| m | 1024 | 8 | 8.000 [7.990 to 8.010] | 7.200 [7.190 to 7.210] | 0.90× | 600 → 300 | H |"]
    monkeypatch.setattr(findings, "rows", lambda study: rows[rows.kv_cache == "native"])
    assert findings.engines_kv() is None


def test_published_studies_stay_small():
    size = sum(p.stat().st_size for p in (ROOT / "studies").rglob("*") if p.is_file())
    assert size < 10e6, size
