"""Quality you can decide on: the distance to the baseline (KL over the whole vocabulary, top-1 agreement,
Δp of the correct token, ln perplexity ratio) from the baseline's reference, intervals on perplexity and its paired
difference, adaptive repeats, LLM.int8's batch dependence, and the driver's handling of references and reuse."""
import json
import math
import random
import textwrap

import pandas as pd
import pytest
import ray
import torch
import torch.nn.functional as F

from cluster.connect import init_embedded
from orchestrator import sweep
from common.stats import mean_interval, paired_log_ratio, perplexity_interval, t975
from common.units import ModelSpec
from tasks import latency, perplexity as P
from tasks.distance import Capture, Reference
from tasks.engines import hf
from tasks.precisions import REGISTRY
from tests.conftest import SMOLLM2, WIKITEXT, write_grid

WINDOWS = dict(protocol="gptq", seqlen=256, stride=256, max_windows=2, batch_size=2, device="cpu")


def make_reference(model, tok, rows, key, tmp_path, **kw):
    cap = Capture()
    base = P.perplexity(model, tok, rows, **{**WINDOWS, **kw}, capture=cap)
    assert cap.problem is None
    return base, cap.save(key, model, base["ppl_window_nll"], base["ppl_window_tokens"], base["perplexity"])


def test_known_distributions_give_the_exact_kl(tmp_path):
    """Hidden states that are log-probabilities and an identity head: the baseline's distributions are exactly p."""
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]], dtype=torch.float64)
    targets = torch.tensor([0, 2, 1])
    path = tmp_path / "ref.pt"
    hidden = torch.cat([p.log(), torch.zeros(1, 3, dtype=torch.float64)])  # position j predicts token j + 1
    torch.save({"digest": "d", "hidden": [hidden], "weight": torch.eye(3, dtype=torch.float64), "bias": None,
                "window_nll": [1.0], "window_tokens": [3], "perplexity": 2.0}, path)
    ref = Reference(str(path), "cpu")
    ref.add(0, 1, 4, q.log(), targets)
    cols = ref.columns(ppl=2.5)
    kl = (p * (p / q).log()).sum(-1)
    assert cols["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-12)
    assert cols["kl_max"] == pytest.approx(kl.max().item(), rel=1e-12)
    assert cols["kl_median"] == pytest.approx(kl.median().item(), rel=1e-12)
    assert cols["top1_agreement"] == pytest.approx(2 / 3)  # 0 = 0, 2 = 2; uniform p's first token 0 against q's 0
    dp = q[range(3), targets] - p[range(3), targets]
    assert cols["delta_p_mean"] == pytest.approx(dp.mean().item()) and cols["delta_p_rms"] == pytest.approx(
        dp.pow(2).mean().sqrt().item())
    assert cols["ln_ppl_ratio"] == pytest.approx(math.log(2.5 / 2.0)) and cols["distance_positions"] == 3


@pytest.mark.slow
def test_a_model_against_itself(smollm2, wikitext_bytes, tmp_path, model_cache):
    model, tok = smollm2
    rows = P.rows_from_raw(wikitext_bytes)
    three = {**WINDOWS, "max_windows": 3}  # an interval needs 3 windows
    base, path = make_reference(model, tok, rows, "self-test", tmp_path, **three)
    again = P.perplexity(model, tok, rows, **three, reference=Reference(path, "cpu"))
    assert again["perplexity"] == pytest.approx(base["perplexity"], rel=1e-6)
    assert again["kl_mean"] < 1e-9 and again["kl_max"] < 1e-7
    assert again["top1_agreement"] == 1.0 and abs(again["delta_p_mean"]) < 1e-7
    assert again["ln_ppl_ratio"] == pytest.approx(0, abs=1e-7)
    assert again["ln_ppl_ratio_ci_low"] <= 0 <= again["ln_ppl_ratio_ci_high"]  # indistinguishable, as it must be


@pytest.mark.slow
def test_distance_equals_a_direct_full_vocabulary_computation(smollm2, wikitext_bytes, tmp_path, model_cache):
    """SmolLM2 nf4 against the fp32 baseline on 2 windows: the project's figures against KL computed directly from
    both models' full logits on the same windows."""
    model, tok = smollm2
    rows = P.rows_from_raw(wikitext_bytes)
    base, path = make_reference(model, tok, rows, "nf4-test", tmp_path)
    nf4 = REGISTRY["nf4"]
    quant = hf.load(ModelSpec("gguf", SMOLLM2, "s"), nf4, nf4.parse_options({"compute_dtype": "fp32"}), "cpu")
    got = P.perplexity(quant, tok, rows, **WINDOWS, reference=Reference(path, "cpu"))
    ids = P.token_ids(tok, P.corpus_text(rows))[:512].view(2, 256)
    with torch.no_grad():
        lp = F.log_softmax(model.module(input_ids=ids).logits[:, :-1].double(), -1).flatten(0, 1)
        lq = F.log_softmax(quant.module(input_ids=ids).logits[:, :-1].double(), -1).reshape(lp.shape)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    t = ids[:, 1:].reshape(-1, 1)
    dp = lq.gather(-1, t).exp() - lp.gather(-1, t).exp()
    assert got["distance_positions"] == kl.numel() == 2 * 255
    assert got["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert got["kl_median"] == pytest.approx(kl.median().item(), rel=1e-3, abs=1e-7)
    assert got["kl_p99"] == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-3)
    assert got["kl_max"] == pytest.approx(kl.max().item(), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx((lp.argmax(-1) == lq.argmax(-1)).double().mean().item(), abs=1e-9)
    assert got["delta_p_mean"] == pytest.approx(dp.mean().item(), rel=1e-4, abs=1e-8)
    assert got["delta_p_rms"] == pytest.approx(dp.pow(2).mean().sqrt().item(), rel=1e-4)
    assert got["ln_ppl_ratio"] == pytest.approx(math.log(got["perplexity"] / base["perplexity"]), rel=1e-12)
    assert 0 < got["kl_mean"] < 1 and 0.5 < got["top1_agreement"] < 1


@pytest.mark.slow
def test_perplexity_interval_holds_the_point_and_narrows(smollm2, wikitext_bytes):
    model, tok = smollm2
    rows = P.rows_from_raw(wikitext_bytes)
    two = P.perplexity(model, tok, rows, **WINDOWS)
    assert two["ppl_ci_low"] is None and two["ppl_ci_high"] is None  # two windows are too few for an interval
    three = P.perplexity(model, tok, rows, **{**WINDOWS, "max_windows": 3})
    eight = P.perplexity(model, tok, rows, **{**WINDOWS, "max_windows": 8, "batch_size": 4})
    for r in (three, eight):
        assert r["ppl_ci_low"] < r["perplexity"] < r["ppl_ci_high"]
        assert len(r["ppl_window_nll"]) == r["ppl_windows"] and sum(r["ppl_window_tokens"]) == r["ppl_tokens_scored"]
        again = perplexity_interval(r["ppl_window_nll"], r["ppl_window_tokens"])  # anyone can recompute it
        assert again == pytest.approx((r["perplexity"], r["ppl_ci_low"], r["ppl_ci_high"]), rel=1e-9)
    assert eight["ppl_ci_high"] - eight["ppl_ci_low"] < three["ppl_ci_high"] - three["ppl_ci_low"]


def test_intervals_by_hand():
    assert t975(1) == 12.706 and t975(30) == 2.042 and 1.96 < t975(1000) < 1.965
    m, lo, hi = mean_interval([1.0, 2.0, 3.0])  # on the log scale: mean × exp(±t × se / mean)
    assert m == 2 and hi == pytest.approx(2 * math.exp(4.303 / math.sqrt(3) / 2))
    assert lo == pytest.approx(2 * math.exp(-4.303 / math.sqrt(3) / 2)) and lo > 0
    assert mean_interval([5.0]) is None and mean_interval([5.0, 6.0]) is None  # too few for an interval
    # equal windows: the ratio interval is the plain interval on window means
    nll, tok = [10.0, 12.0, 11.0, 13.0], [5, 5, 5, 5]
    ppl, lo, hi = perplexity_interval(nll, tok)  # the interval on the mean loss per token, through exp
    means = [x / 5 for x in nll]
    m = sum(means) / 4
    half = t975(3) * (sum((x - m) ** 2 for x in means) / 3) ** 0.5 / 2
    assert ppl == pytest.approx(math.exp(m)) and lo == pytest.approx(math.exp(m - half))
    assert hi == pytest.approx(math.exp(m + half))
    r, lo, hi = paired_log_ratio([11.0, 13.0, 12.0, 14.0], nll, tok)  # every window 1 nat worse: exactly 0.2/token
    assert r == pytest.approx(0.2) and lo == pytest.approx(0.2) and hi == pytest.approx(0.2)


def test_adaptive_repeats_stop_early_when_steady_and_run_to_the_limit_when_noisy():
    steady = lambda: ([5.0] + [2.0] * 20, None)  # noqa: E731  (no host clock read)
    record, stop = latency.timed_runs(steady, 1, 21, repeats=0, max_repeats=30, target_halfwidth=0.02)
    assert stop == "target" and len(record.ttft_ms) == 3
    rng = random.Random(0)
    noisy = lambda: ([5.0] + [rng.choice([1.0, 4.0])] * 20, None)  # noqa: E731  (each run's mean 1 or 4 ms)
    record, stop = latency.timed_runs(noisy, 1, 21, repeats=0, max_repeats=12, target_halfwidth=0.02)
    assert stop == "max_repeats" and len(record.ttft_ms) == 12
    slow = lambda: ([400.0] + [rng.choice([100.0, 150.0])] * 10, None)  # noqa: E731  (1.4 or 1.9 s of work a run)
    record, stop = latency.timed_runs(slow, 1, 11, repeats=0, max_repeats=100, max_seconds=3.0,
                                      target_halfwidth=1e-9)
    assert stop == "max_seconds" and len(record.ttft_ms) in (2, 3)
    record, stop = latency.timed_runs(steady, 1, 21, repeats=5)  # a number keeps working as before
    assert stop == "fixed" and len(record.ttft_ms) == 5
    s = record.summary()
    assert s["repeats_done"] == 5 and s["repeats_stop"] == "fixed"
    assert s["decode_ms_ci_low"] == s["decode_ms_ci_high"] == 2.0 and s["decode_ci_rel_halfwidth"] == 0


@pytest.mark.slow
def test_llm_int8_depends_on_batching_and_the_default_gives_one_window(wikitext_bytes, model_cache):
    """LLM.int8 with outliers picks its outlier columns per input matrix: two windows in one pass score differently
    from one at a time (seen on an H200: 22.0331 with 8 per pass, 22.015 alone). The default batch for it is 1."""
    from tasks import unit as U
    from tests.test_measurements import make_unit
    from common.units import PerplexitySpec

    int8 = REGISTRY["int8"]
    opts = int8.parse_options({"compute_dtype": "fp32"})
    assert not int8.method.batch_invariant(opts) and int8.method.batch_invariant(int8.parse_options({"threshold": 0.0}))
    assert REGISTRY["nf4"].method.batch_invariant(REGISTRY["nf4"].parse_options({}))
    model = hf.load(ModelSpec("gguf", SMOLLM2, "s"), int8, opts, "cpu")
    rows = P.rows_from_raw(wikitext_bytes)
    batched = P.perplexity(model, model.tokenizer, rows, **{**WINDOWS, "batch_size": 2})["perplexity"]
    alone = P.perplexity(model, model.tokenizer, rows, **{**WINDOWS, "batch_size": 1})["perplexity"]
    assert abs(batched / alone - 1) > 1e-5
    unit = make_unit("int8", {"compute_dtype": "fp32"}, model=ModelSpec("gguf", SMOLLM2, "s"), cells=((2, 1),),
                     ppl=PerplexitySpec("gptq", 256, 256, 2, None, "local", "x"))
    row = list(U.run_unit(unit, wikitext_bytes))[0]
    assert row["ppl_batch_size"] == 1 and row["ppl_batch_invariant"] is False
    assert row["perplexity"] == pytest.approx(alone, rel=1e-9)


# ----------------------------------------------------------------------- the driver: references, failure, reuse

@pytest.fixture(scope="module")
def cpu_ray():
    init_embedded(num_cpus=2, num_gpus=0, log_to_driver=False)
    yield
    ray.shutdown()


def quality_grid(tmp_path, models):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=1000).save_pretrained(tmp_path / "folder")
    return write_grid(tmp_path / "g.yaml", textwrap.dedent(f"""
        name: quality
        models:
{textwrap.indent(models, " " * 8)}
        precisions: [fp16, nf4, int8]
        baseline: fp16
        generation: {{new_tokens: [1, 2], batch_sizes: [1]}}
        perplexity: {{path: {WIKITEXT}, max_windows: 1}}
        resources: {{timeout_s: 60, retries: 0, cpus_per_task: 1}}
    """))


RUNNER = "tests.scripted:run_unit"
MODELS = (f"  - {{gguf: '{SMOLLM2}', label: fine}}\n"
          f"  - {{path: ./folder, label: baseline-fails}}")


@pytest.mark.slow  # 10 s (Ray and three real units): the fast lane keeps under 2 minutes
def test_the_baseline_goes_first_and_its_failure_leaves_the_rest_complete(cpu_ray, tmp_path, model_cache):
    out = tmp_path / "out"
    code = sweep.run(str(quality_grid(tmp_path, MODELS)), [], output=str(out), runner=RUNNER, live=False)
    df = pd.read_parquet(out / "cells").set_index(["model", "precision", "new_tokens"]).sort_index()
    assert code == 1  # the failed baseline's cells
    assert set(df.loc[("baseline-fails", "fp16")].status) == {"error"}
    others = df.loc["baseline-fails"].drop(index="fp16", level=0)
    assert set(others.status) == {"ok"} and len(others) == 4  # every other cell measured
    assert others.distance_missing.str.contains("ended without making its reference").all()
    fine = df.loc["fine"]
    assert set(fine.status) == {"ok"} and (fine.drop(index="fp16", level=0).distance_reference == "fp16").all()
    assert (fine.loc["fp16"].distance_reference == "self (the baseline)").all()
    # a later sweep with other generation settings reuses perplexity and distance: nothing waits for a reference
    assert sweep.run(str(tmp_path / "g.yaml"), ["generation.new_tokens=[3]"], output=str(out), runner=RUNNER,
                     live=False) == 1
    df = pd.read_parquet(out / "cells")
    new = df[(df.new_tokens == 3) & (df.model == "fine")]
    assert len(new) == 3 and new.quality_reused.all() and (new.perplexity == 10.0).all()
    assert set(new[new.precision != "fp16"].distance_reference) == {"fp16"}
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert len(runs) == 2 and len(pd.read_parquet(out / "cells")) == 18  # both grids' cells kept (a cache of cells)


def test_a_consumer_alone_gets_a_reference_only_baseline_task(cpu_ray, tmp_path, model_cache):
    """The baseline's cells are all done, nf4 gets a new cell and its quality is not known: the baseline is loaded
    for its reference only (no rows), and nf4's distance is measured against it."""
    out = tmp_path / "out"
    g = str(quality_grid(tmp_path, f"  - {{gguf: '{SMOLLM2}', label: fine}}"))
    assert sweep.run(g, ["precisions=[fp16]"], output=str(out), runner=RUNNER, live=False) == 0
    assert sweep.run(g, ["precisions=[fp16, nf4]"], output=str(out), runner=RUNNER, live=False) == 0
    df = pd.read_parquet(out / "cells")
    assert len(df) == 4 and set(df[df.precision == "nf4"].distance_reference) == {"fp16"}
    assert df[df.precision == "fp16"].run_id.nunique() == 1  # the baseline's rows were not measured again


@pytest.mark.slow
def test_distances_through_ray_with_the_real_worker(cpu_ray, tmp_path, model_cache):
    """SmolLM2 fp32 (baseline) and nf4 through the sweep: the baseline's unit makes the reference during its
    perplexity pass and Ray carries it to nf4's unit, which measures its distance on the same windows."""
    out = tmp_path / "out"
    g = write_grid(tmp_path / "g.yaml", textwrap.dedent(f"""
        name: distance
        models: [{{gguf: '{SMOLLM2}', label: smollm2}}]
        precisions: [fp32, {{name: nf4, compute_dtype: fp32}}]
        generation: {{new_tokens: [2], batch_sizes: [1], prompt_tokens: 8, warmup: 0, repeats: 2}}
        perplexity: {{path: {WIKITEXT}, seqlen: 256, max_windows: 3}}
        resources: {{timeout_s: 600, retries: 0}}
    """))
    assert sweep.run(str(g), [], output=str(out), live=False) == 0
    df = pd.read_parquet(out / "cells").set_index("precision")
    base, nf4 = df.loc["fp32"], df.loc["nf4(compute_dtype=fp32)"]
    assert base.distance_reference == "self (the baseline)" and base.kl_mean == 0 and base.top1_agreement == 1
    assert nf4.distance_reference == "fp32" and 0 < nf4.kl_mean < 1 and 0.5 < nf4.top1_agreement < 1
    assert nf4.distance_positions == base.ppl_tokens_scored == 3 * 255
    assert nf4.ln_ppl_ratio == pytest.approx(math.log(nf4.perplexity / base.perplexity), rel=1e-9)
    assert nf4.ln_ppl_ratio_ci_low < nf4.ln_ppl_ratio < nf4.ln_ppl_ratio_ci_high
    assert list(nf4.ppl_window_nll) and base.ppl_ci_low < base.perplexity < base.ppl_ci_high
