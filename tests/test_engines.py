"""The engine axis and vLLM as a second engine, on CPU: grid validation with `engine: [hf, vllm]`, the keys, units and
skips the planner makes of it, each precision's explicit vLLM mapping, and tasks/engines/vllm.py itself driven by a
stand-in for vLLM's offline API (tests/fake_vllm: the same calls, answered by transformers). Every vLLM figure the
project publishes comes from a real vLLM on a GPU."""
import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.grid import load_grid
from orchestrator.plan import make_plan, unsupported_before_start, unsupported_cells
from common.units import CellSpec, GenerationSpec, ModelSpec, PrecisionSpec, UnitSpec
from common.untrusted import BadInput
from tasks.precisions import REGISTRY
from tests.conftest import SMOLLM2, TINY_LLAMA, write_grid



def grid(tmp_path, engine="[hf, vllm]", precisions="[fp16, nf4-dq]", extra="", decode="[eager, compiled]",
         perplexity="false", kv="[native]", generation=""):
    return load_grid(write_grid(tmp_path / "g.yaml", textwrap.dedent(f"""
        name: engines
        models: [{{synthetic: {json.dumps(TINY_LLAMA)}, label: tiny}}]
        precisions: {precisions}
        engine: {engine}
        generation: {{new_tokens: [4], batch_sizes: [1, 2], decode: {decode}, kv_cache: {kv}{generation}}}
        perplexity: {perplexity}
    """) + extra))


# -------------------------------------------------------------------------------------------- grid and planner

def test_engine_is_an_axis_of_the_cell_key(tmp_path):
    both = make_plan(grid(tmp_path), "r", None, 1)
    hf_only = make_plan(grid(tmp_path, engine="hf"), "r", None, 1)
    by_engine = {e: [u for u in both.units if u.engine == e] for e in ("hf", "vllm")}
    # transformers: one unit (one load) per precision; vLLM: one per decode path (enforce_eager is its setting)
    assert len(by_engine["hf"]) == 2 and len(by_engine["vllm"]) == 4
    assert {c.key for u in by_engine["hf"] for c in u.cells} == {c.key for c in hf_only.cells}  # hf keys unchanged
    vllm_keys = {c.key for u in by_engine["vllm"] for c in u.cells}
    assert len(vllm_keys) == 8 and vllm_keys.isdisjoint(c.key for c in hf_only.cells)
    assert all({c.decode for c in u.cells} == {u.cells[0].decode} for u in by_engine["vllm"])
    assert len({u.unit_id for u in both.units}) == 6
    assert {u.label for u in by_engine["vllm"]} == {"tiny × fp16 × vllm", "tiny × fp16 × vllm (eager)",
                                                    "tiny × nf4-dq × vllm", "tiny × nf4-dq × vllm (eager)"}
    assert load_grid(write_grid(tmp_path / "one.yaml", (tmp_path / "g.yaml").read_text()
                                .replace("engine: hf", "engine: vllm"))).engine == ["vllm"]


def test_vllm_units_are_named_by_the_engine_settings_that_split_them(tmp_path):
    plan = make_plan(grid(tmp_path, engine="[hf, vllm]", precisions="[fp16]", kv="[native, fp8]"), "r", None, 1)
    labels = sorted(u.label for u in plan.units)
    assert labels == ["tiny × fp16", "tiny × fp16 × vllm", "tiny × fp16 × vllm (KV fp8)",
                      "tiny × fp16 × vllm (eager)", "tiny × fp16 × vllm (eager, KV fp8)"]


@pytest.mark.parametrize("engine,expected", [("[hf, hf]", "listed twice"), ("[sglang]", "engine[0]")])
def test_bad_engines_are_refused(tmp_path, engine, expected):
    with pytest.raises(BadInput, match=expected.replace("[", r"\[")):
        grid(tmp_path, engine=engine)


def test_what_vllm_cannot_run_is_skipped_before_start_with_why(tmp_path):
    g = grid(tmp_path, precisions="[fp16, nf4, int8, hqq, {name: gptq, kernel: torch}, gptq, fp8-w8a8]",
             extra="baseline: fp16\n")
    plan = make_plan(g, "r", None, 1)
    on_gpu = unsupported_before_start(plan, "cuda", ["H100"])
    reasons = {u.label: on_gpu.get(u.unit_id) for u in plan.units if u.engine == "vllm"}
    assert reasons["tiny × fp16 × vllm"] is None and reasons["tiny × gptq × vllm"] is None
    assert reasons["tiny × fp8-w8a8 × vllm"] is None
    assert "use nf4-dq" in reasons["tiny × nf4 × vllm"]
    assert "not in flight" in reasons["tiny × int8 × vllm"]
    assert reasons["tiny × hqq × vllm"] == "hqq has no vllm path"
    assert "vLLM picks its own" in reasons["tiny × gptq(kernel=torch) × vllm"]
    gptq = dataclasses.replace(REGISTRY["gptq"].method, distribution="no-such-distribution")
    with pytest.MonkeyPatch.context() as mp:  # gptqmodel absent: a synthetic model through vLLM does not need it
        mp.setitem(REGISTRY, "gptq", dataclasses.replace(REGISTRY["gptq"], method=gptq))
        absent = unsupported_before_start(plan, "cuda", ["H100"])
    assert absent.get(next(u.unit_id for u in plan.units if u.label == "tiny × gptq × vllm")) is None
    assert "not installed" in absent[next(u.unit_id for u in plan.units if u.label == "tiny × gptq")]
    on_cpu = unsupported_before_start(plan, "cpu", [])
    assert all("vLLM runs on NVIDIA GPUs only" in on_cpu[u.unit_id] for u in plan.units if u.engine == "vllm")
    assert "fp8-w8a8 does not run on cpu" in on_cpu[next(u.unit_id for u in plan.units
                                                          if u.engine == "hf" and u.precision.name == "fp8-w8a8")]


def test_kv_caches_belong_to_their_engine(tmp_path):
    plan = make_plan(grid(tmp_path, precisions="[fp16]", decode="[eager]", kv="[native, fp8, quanto-int4]"), "r",
                     None, 1)
    skipped = unsupported_cells(plan, "cuda")
    why = {(u.engine, c.kv.name): skipped.get(c.key) for u in plan.units for c in u.cells}
    assert why[("hf", "native")] is None and why[("vllm", "native")] is None and why[("vllm", "fp8")] is None
    assert why[("hf", "fp8")] == "kv_cache fp8 runs on vllm only, not on hf"
    assert why[("vllm", "quanto-int4")] == "kv_cache quanto-int4 runs on hf only, not on vllm"
    with pytest.raises(BadInput, match="fp8 takes no options"):
        grid(tmp_path, precisions="[fp16]", kv="[native, {name: fp8, q_group_size: 64}]")
    assert plan.units[0].engine == "hf" and {u.engine for u in plan.units} == {"hf", "vllm"}


def test_vllm_fp8_kv_beside_fp16_activations_is_skipped_on_hopper(tmp_path):
    """vLLM's FlashAttention 3 (compute capability 9.x) writes bf16 only beside an fp8 KV cache: fp16 activations
    with it are skipped before start there, bf16 ones run; on another GPU (or one not known) nothing is skipped."""
    plan = make_plan(grid(tmp_path, engine="vllm", precisions="[fp16, bf16, awq]", decode="[compiled]",
                          kv="[native, fp8]"), "r", None, 1)
    for gpu, skipped in (("H100", {"tiny × fp16 × vllm (KV fp8)", "tiny × awq × vllm (KV fp8)"}), ("A100", set())):
        why = unsupported_before_start(plan, "cuda", [gpu])
        assert {u.label for u in plan.units if why.get(u.unit_id)} == skipped, gpu
        assert all("use bf16 activations" in why[u.unit_id] for u in plan.units if u.unit_id in why)
    assert unsupported_before_start(plan, "cuda", ["H100", "A100"]) == {}


def test_every_precision_says_how_vllm_runs_it_or_why_not():
    """The mapping is explicit: each precision of the registry has vLLM arguments or a reason."""
    args = {}
    for name, p in REGISTRY.items():
        opts = p.parse_options({})
        reason = p.engine_reason("vllm", opts)
        args[name] = reason or p.engine_args("vllm", opts)
    assert args["fp16"] == {"dtype": "float16"} and args["bf16"] == {"dtype": "bfloat16"}
    assert args["fp8-w8a8"] == {"quantization": "fp8", "dtype": "bfloat16"}
    assert args["nf4-dq"] == {"quantization": "bitsandbytes", "dtype": "bfloat16"}
    assert args["gptq"] == args["awq"] == {"dtype": "float16"} and args["saved"] == {"dtype": "auto"}
    assert all(isinstance(args[n], str) for n in ("nf4", "fp4", "int8", "hqq", "quanto-int8", "torchao-int4wo"))
    nf4 = REGISTRY["nf4"]
    assert nf4.engine_reason("vllm", nf4.parse_options({"double_quant": True})) is None


def test_the_reference_is_the_first_engines_baseline_and_the_other_engines_baseline_is_measured_against_it(tmp_path):
    """KL(hf fp16 || vllm fp16) is the engines' own distance: the vLLM fp16 unit uses the hf fp16 reference."""
    from orchestrator.wikitext import Texts

    grid(tmp_path)
    text = (tmp_path / "g.yaml").read_text().replace(f"synthetic: {json.dumps(TINY_LLAMA)}", f"gguf: {SMOLLM2}")
    g = load_grid(write_grid(tmp_path / "real.yaml", text.replace("perplexity: false", "perplexity: {}")))
    plan = make_plan(g, "r", Texts(None, {"sha256": "s", "dataset": "d"}), 1)
    refs = {(u.engine, u.precision.label, u.cells[0].decode): u.reference for u in plan.units}
    make = refs[("hf", "fp16", "eager")]
    assert make.role == "make" and make.baseline == "fp16"
    uses = [r for k, r in refs.items() if k[0] == "vllm"]
    assert len(uses) == 4 and all(r.role == "use" and r.key == make.key for r in uses)
    assert refs[("hf", "nf4-dq", "eager")].key == make.key
    keys = {u.quality_key for u in plan.units}
    assert len(keys) == len(plan.units)  # each unit's quality is its own


# ------------------------------------------------------------------------------- the vLLM engine, on a stand-in

def unit(engine="vllm", cells=((4, 2, "compiled"),), precision="fp16", perplexity=None, throughput=None):
    p = REGISTRY[precision]
    spec = PrecisionSpec(precision, p.parse_options({}).model_dump(), precision)
    return UnitSpec("s", "r", "u", ModelSpec("synthetic", TINY_LLAMA, "tiny"), spec,
                    [CellSpec(f"k{i}", n, b, d, prompt_tokens=8) for i, (n, b, d) in enumerate(cells)],
                    GenerationSpec(warmup=1, repeats=2, throughput=throughput), perplexity, gpus=0, engine=engine)


def test_a_vllm_unit_measures_its_cells_through_the_engine(fake_vllm):
    from tasks import unit as U

    rows = list(U.run_unit(unit(cells=((4, 2, "compiled"), (3, 1, "compiled")))))
    assert [r["status"] for r in rows] == ["ok", "ok"], rows[0].get("traceback")
    r = rows[0]
    assert r["engine"] == "vllm" and r["engine_version"] == "0.0.0+fake"
    assert r["timing_source"].startswith("vLLM engine steps")
    assert len(r["decode_ms_samples"]) == 2 * 3 and r["ttft_ms"] > 0  # 2 timed runs of 3 gaps each
    options = json.loads(r["engine_options"])
    assert options["enforce_eager"] is False and options["kv_cache_dtype"] == "auto"
    assert options["max_num_seqs"] == 2 and options["enable_prefix_caching"] is False
    assert options["max_model_len"] == 8 + 4 and options["block_size"] == 16
    assert r["kv_block_tokens"] == 16 and r["kv_block_bytes"] == 2 * 2 * 2 * 16 * 16 * 2
    assert r["kv_cache_tensor_bytes"] == 2 * r["kv_block_bytes"]  # two sequences of 12 tokens: a block each
    assert len(fake_vllm.MADE) == 1  # one LLM for the unit
    from orchestrator.store import row_table

    assert row_table(rows).num_rows == 2  # every column the engine writes is in the schema
    made = fake_vllm.MADE[0]
    assert made["kv_cache_memory_bytes"] == r["kv_pool_bytes"] and made["dtype"] == "float16"


LLAMA_LINEARS = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                 "self_attn.q_proj", "self_attn.v_proj"]


@pytest.mark.parametrize("method,config,kernel", [
    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
              "modules_in_block_to_quantize": LLAMA_LINEARS}, "AutoGPTQLinearMethod"),
    ("awq", {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
     "AutoAWQMarlinLinearMethod")])
def test_a_synthetic_model_takes_calibrated_formats_with_random_packed_weights(fake_vllm, monkeypatch, tmp_path,
                                                                               method, config, kernel):
    """Random weights gain nothing from calibration: vLLM gets the checkpoint's config alone and fills the packed
    weights itself (load_format dummy); nothing is calibrated, and the row says so."""
    from tasks import unit as U
    from tasks.engines import vllm as V

    monkeypatch.setenv("QSWEEP_CACHE", str(tmp_path))

    def never(*a, **k):
        raise AssertionError("calibrated a synthetic model")

    import tasks.precisions.gptq.calibration as calibration

    monkeypatch.setattr(calibration, "quantized_folder", never)
    rows = list(U.run_unit(unit(precision=method)))
    assert rows[0]["status"] == "ok", rows[0].get("traceback")
    made = fake_vllm.MADE[0]
    assert made["load_format"] == "dummy" and made["dtype"] == "float16"
    assert json.loads((Path(made["model"]) / "config.json").read_text())["quantization_config"] == config
    assert not any(Path(made["model"]).glob("*.safetensors"))
    assert rows[0]["calib_text"] == V.RANDOM_PACKED and rows[0]["calib_samples"] == 0
    assert rows[0]["linear_class"] == kernel  # the folder names the layers a GPTQ checkpoint's tensors would
    assert json.loads(rows[0]["engine_options"])["load_format"] == "dummy"


def test_a_quantized_precision_vllm_builds_unquantized_fails_its_unit(fake_vllm, monkeypatch, tmp_path):
    """A GPTQ config naming no layer (vLLM then looks for quantized tensors, and a folder of none has none) loads
    every layer in fp16: the unit fails instead of publishing fp16 figures as GPTQ's."""
    from tasks import unit as U
    from tasks.engines import vllm as V

    monkeypatch.setenv("QSWEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(V, "block_linears", lambda source: [])
    rows = list(U.run_unit(unit(precision="gptq")))
    assert rows[0]["status"] == "error"
    assert "unquantized" in rows[0]["error_message"] and "gptq" in rows[0]["error_message"]
    plain = list(U.run_unit(unit(precision="fp16")))
    assert plain[0]["status"] == "ok" and plain[0]["linear_class"] == "UnquantizedLinearMethod"


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_a_source_saved_quantized_fails_its_unit(fake_vllm, tmp_path, engine):
    """A hub model fetched in the unit is checked there: saved quantized, it would load quantized under fp16's name."""
    from tasks import unit as U

    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 1000,
              "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    u = dataclasses.replace(unit(engine=engine), model=ModelSpec("path", str(tmp_path), "saved"))
    rows = list(U.run_unit(u))
    assert rows[0]["status"] == "error"
    assert "saved quantized (compressed-tensors" in rows[0]["error_message"]


@pytest.mark.parametrize("covers_last", [False, True])
def test_vllm_scores_windows_from_its_logits_processor_and_checks_them(fake_vllm, monkeypatch, covers_last):
    """hidden_states are what the logits processor received, in position order across its calls (the sampled
    position first, prompt positions in chunks, which may or may not cover the last position), and the
    log-probabilities recomputed from them must be vLLM's."""
    import torch

    from tasks.engines import hf, vllm as engine

    p = REGISTRY["fp32"]
    spec = ModelSpec("synthetic", TINY_LLAMA, "tiny")
    u = unit(precision="fp32")
    monkeypatch.setattr(fake_vllm, "PROMPT_COVERS_LAST", covers_last)
    served = engine.load(spec, p, p.parse_options({}), "cpu", None, u)
    plain = hf.load(spec, p, p.parse_options({}), "cpu")
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(served.logits(ids), plain.logits(ids), atol=1e-4)
    assert served.facts["logprob_check_max_abs"] < 1e-5
    weight, _ = served.output_head()
    assert weight.shape == (1000, 64)
    with pytest.raises(RuntimeError, match="prompt rows"):
        engine._order([torch.zeros(3, 4)], 40)
    with pytest.raises(NotImplementedError):
        served.logits_through_cache(ids, 8, None)


def test_offline_throughput_is_a_generation_setting_off_by_default(tmp_path):
    assert make_plan(grid(tmp_path), "r", None, 1).generation.throughput is None
    plan = make_plan(grid(tmp_path, decode="[eager]", generation=", throughput: {requests: 32}"), "r", None, 1)
    assert plan.generation.throughput == (32, 512, 128)
    assert plan.units[0].to_task(plan).generation.throughput == (32, 512, 128)
    with pytest.raises(BadInput, match="throughput"):
        grid(tmp_path, generation=", throughput: {requests: 0}")


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_offline_throughput_is_one_figure_per_unit_on_every_row(fake_vllm, engine):
    """Six requests of 10 prompt tokens handed over together, 5 tokens each: tokens/s with its interval over at
    least 3 timed runs, the same on both cells' rows; vLLM's LLM is sized to hold all six at once."""
    from orchestrator.store import row_table
    from tasks import unit as U

    rows = list(U.run_unit(unit(engine, cells=((4, 2, "eager"), (3, 1, "eager")), precision="fp32",
                                throughput=(6, 10, 5))))
    assert [r["status"] for r in rows] == ["ok", "ok"], rows[0].get("traceback")
    r = rows[0]
    assert "throughput_missing" not in r
    assert len(r["throughput_s_samples"]) == 3  # repeats=2 asked for; an interval needs 3
    rates = [6 * 5 / s for s in r["throughput_s_samples"]]
    assert r["throughput_ci_low"] < r["throughput_tokens_per_s"] < r["throughput_ci_high"]
    assert min(rates) <= r["throughput_tokens_per_s"] <= max(rates)
    assert (r["throughput_requests"], r["throughput_prompt_tokens"], r["throughput_new_tokens"]) == (6, 10, 5)
    assert rows[1]["throughput_tokens_per_s"] == r["throughput_tokens_per_s"]
    assert row_table(rows).num_rows == 2
    if engine == "vllm":
        made = fake_vllm.MADE[0]
        assert made["max_num_seqs"] == 6 and made["max_model_len"] == 15
        assert made["kv_cache_memory_bytes"] >= 6 * 1 * (2 * 2 * 2 * 16 * 16 * 4)  # six sequences, a block each


def test_a_throughput_that_fails_is_written_down_and_the_cells_still_run(monkeypatch):
    from tasks import latency, unit as U

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    import torch

    monkeypatch.setattr(latency, "measure_throughput", boom)
    rows = list(U.run_unit(unit("hf", cells=((4, 2, "eager"),), precision="fp32", throughput=(6, 10, 5))))
    assert rows[0]["status"] == "ok" and rows[0]["throughput_missing"].startswith("OutOfMemoryError: CUDA out of")


# -------------------------------------------------------------------------------------------- several GPUs a unit

def wide_grid(tmp_path, engine: str, gpus, decode="[eager]", perplexity="false"):
    return grid(tmp_path, engine, "[fp16]", f"resources: {{gpus_per_task: {gpus}}}\n", decode, perplexity)


@pytest.mark.parametrize("engine, gpus, decode, perplexity, refusal", [
    ("hf", 2, "[eager, compiled]", "false", "engine hf splits the model's layers across them and decodes eager only"),
    ("vllm", 4, "[compiled]", "{max_windows: 3}", "engine vllm runs tensor parallel and scores no perplexity there"),
    ("hf", 1.5, "[eager]", "false", "holds a whole number of them, not 1.5"),
])
def test_a_unit_over_several_gpus_is_refused_where_its_engine_cannot_serve_it(tmp_path, engine, gpus, decode,
                                                                              perplexity, refusal):
    with pytest.raises(BadInput, match=f"resources.gpus_per_task: .*{refusal}"):
        wide_grid(tmp_path, engine, gpus, decode, perplexity)


@pytest.mark.parametrize("engine, decode", [("hf", "[eager]"), ("vllm", "[eager, compiled]")])
def test_a_unit_over_several_gpus_is_planned_where_its_engine_can_serve_it(tmp_path, engine, decode):
    plan = make_plan(wide_grid(tmp_path, engine, 2, decode), "r", None, 2)
    assert plan.units and plan.gpus_per_task == 2 and all(u.to_task(plan).gpus == 2 for u in plan.units)
    one = {c.key for c in make_plan(wide_grid(tmp_path, engine, 1, decode), "r", None, 1).cells}
    assert {c.key for c in plan.cells}.isdisjoint(one)  # the GPUs a unit holds are part of its cells' keys


def test_several_gpus_split_hf_layers_and_make_vllm_tensor_parallel(fake_vllm, monkeypatch):
    import torch

    from tasks.engines import hf, vllm as engine

    wide = dataclasses.replace(unit(cells=((4, 2, "eager"),)), gpus=2)
    assert hf.device_map("cpu", wide) == {"": "cpu"}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert hf.device_map("cuda:0", wide) == "auto" and hf.device_map("cuda:0", unit()) == {"": "cuda:0"}
    p = REGISTRY["fp32"]
    one = engine.load(wide.model, p, p.parse_options({}), "cpu", None, unit(cells=((4, 2, "eager"),)))
    two = engine.load(wide.model, p, p.parse_options({}), "cpu", None, wide)
    assert "tensor_parallel_size" not in one.options and two.options["tensor_parallel_size"] == 2
    assert two.options["kv_cache_memory_bytes"] * 2 >= one.options["kv_cache_memory_bytes"] \
        > two.options["kv_cache_memory_bytes"]  # the pool is per GPU: each rank holds half of every block
    assert two.pool_bytes == one.pool_bytes  # the unit's whole pool


def test_energy_is_summed_over_the_units_gpus(monkeypatch):
    import types

    import torch

    from tasks import energy

    counters = {"cuda:0": iter(range(1000, 10 ** 6, 7)), "cuda:1": iter(range(5000, 10 ** 6, 3))}
    fake = types.SimpleNamespace(nvmlDeviceGetTotalEnergyConsumption=lambda h: next(counters[h]))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(energy, "nvml_handle", lambda d: d)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(energy, "update_interval_ms", lambda read: read() and 100.0)
    meter = energy.EnergyMeter("cuda:0")
    assert meter.devices == ["cuda:0", "cuda:1"] and meter.missing is None
    a = meter.joules()
    b = meter.joules()
    assert a == pytest.approx((1000 + 7 * 2 + 5000 + 3 * 1) / 1e3)  # both GPUs' counters, millijoules to joules
    assert b - a == pytest.approx((7 + 3) / 1e3)
