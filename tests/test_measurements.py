"""Measurements on CPU: every precision on a tiny synthetic model, rows that fit the schema, memory and latency
records, skipped and failed cells, GGUF conversion cache, the bandwidth table."""
import contextlib
import dataclasses
import json

import pytest

from orchestrator.store import Store
from common.catalog import datasheet_bandwidth_gbs
from common.schema import NAMES
from common.units import CellSpec, GenerationSpec, ModelSpec, PerplexitySpec, PrecisionSpec, UnitSpec
from tasks import latency, sources, unit as U
from tasks.engines import hf, hf_loop
from tasks.precisions import REGISTRY
from tests.conftest import SMOLLM2, TINY_LLAMA, TINY_OPT

ALL = ["fp32", "fp16", "bf16", "int8", "nf4", "fp4", "nf4-dq"]


def make_unit(precision="fp32", options=None, model=None, cells=((4, 1), (6, 2)), ppl=None, label="tiny",
              prompt_tokens=8, **generation):
    opts = REGISTRY[precision].parse_options(options or {}).model_dump()
    return UnitSpec("t", "r", "u", model or ModelSpec("synthetic", TINY_LLAMA, label),
                    PrecisionSpec(precision, opts, precision),
                    [CellSpec(f"k{n}-{b}", n, b, prompt_tokens=prompt_tokens) for n, b in cells],
                    GenerationSpec(**{"warmup": 1, "repeats": 2, **generation}), ppl, 0)


def tiny(precision="fp32", shapes=TINY_LLAMA):
    p = REGISTRY[precision]
    return hf.load(ModelSpec("synthetic", shapes, "tiny"), p, p.parse_options({}), "cpu")


@pytest.fixture(scope="module")
def rows_by_precision():
    out = {}
    for p in ALL:
        out[p] = list(U.run_unit(make_unit(p)))  # default options: 4-bit computes in bf16, int8 in fp16
    return out


@pytest.mark.parametrize("precision", ALL)
def test_every_precision_runs_on_cpu(rows_by_precision, precision, tmp_path):
    rows = rows_by_precision[precision]
    assert [r["status"] for r in rows] == ["ok", "ok"], rows[0].get("traceback")
    r = rows[1]
    assert set(r) <= set(NAMES)
    Store(tmp_path, "r").write(r)  # fits the Parquet schema
    assert r["params"] == rows_by_precision["fp32"][1]["params"]  # 4-bit tensors counted unpacked
    assert r["model_loads_in_worker"] >= 1  # one per worker under Ray; here every unit shares the test process
    assert r["weights_note"].startswith("synthetic weights")
    assert r["ppl_skipped_reason"] == "perplexity off in the grid"
    # exactly new_tokens tokens: prefill gives the first, new_tokens-1 decode gaps per repeat
    assert len(r["decode_ms_samples"]) == 2 * (6 - 1) and len(r["ttft_ms_samples"]) == 2
    # the analytic KV cache equals the bytes of the cache tensors: 2 x layers x kv_heads x head_dim x tokens x batch
    assert r["kv_cache_bytes"] == r["kv_cache_tensor_bytes"] == 2 * 2 * 2 * 16 * (8 + 6 - 1) * 2 * r["kv_bytes_per_element"]
    assert r["decode_bytes_per_step"] > r["weights_bytes"] - r["embedding_unread_bytes"]
    assert 0 < r["bandwidth_fraction"] < 1.5 and r["peak_bandwidth_source"] == "measured-copy"
    assert r["device"] == "cpu" and r["torch_version"] and r["transformers_version"] and r["bitsandbytes_version"]
    assert "math" in r["sdpa_backends"].split(",") and r["cuda_alloc_conf"] == ""  # options that move the numbers
    assert json.loads(r["precision_options"]) == make_unit(precision).precision.options
    assert not_plain(r) == []  # the driver unpickles rows: a torch type (TorchVersion) made it import torch, 2-2.5 s


def test_fingerprint_records_the_attention_backends_and_the_allocator(monkeypatch):
    """The attention backends torch may use (cuDNN's per-length plans made a first generation 3-4x slower on an
    H200) and the allocator's configuration (expandable segments change what fragmentation holds) move the numbers."""
    import torch

    from tasks.hardware import fingerprint

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert fingerprint("cpu")["cuda_alloc_conf"] == "expandable_segments:True"
    assert set(fingerprint("cpu")["sdpa_backends"].split(",")) == {"flash", "efficient", "math", "cudnn"}
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        assert "cudnn" not in fingerprint("cpu")["sdpa_backends"].split(",")
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def not_plain(value, where="row") -> list[str]:
    """Values that are not plain Python builtins, by where they are (rows cross from the unit to the driver)."""
    if isinstance(value, dict):
        return [w for k, v in value.items() for w in not_plain(v, f"{where}[{k!r}]")]
    if isinstance(value, (list, tuple)):
        return [w for i, v in enumerate(value) for w in not_plain(v, f"{where}[{i}]")]
    if value is None or type(value) in (str, int, float, bool, bytes):
        return []
    return [f"{where}: {type(value).__module__}.{type(value).__qualname__}"]


def test_quantization_shrinks_weights(rows_by_precision):
    bits = {p: rows_by_precision[p][0]["bits_per_param"] for p in ALL}
    assert bits["fp32"] == pytest.approx(32, abs=0.01)
    assert bits["fp16"] == pytest.approx(16, abs=0.01) and bits["bf16"] == pytest.approx(16, abs=0.01)
    # bitsandbytes keeps embeddings and the LM head in 16/32 bits; the linear layers shrink
    assert bits["int8"] < bits["fp16"]
    assert bits["nf4"] < bits["int8"] and bits["fp4"] < bits["int8"]
    assert json.loads(rows_by_precision["nf4-dq"][0]["precision_options"])["double_quant"] is True


# one small module per library; every one of these runs on CPU (torchao int4 with the packing CPU has)
MORE = {"torchao-int8wo": {}, "torchao-int8dq": {}, "torchao-int4wo": {"group_size": 32}, "torchao-fp8wo": {},
        "quanto-int8": {}, "quanto-int4": {}, "quanto-int2": {},
        "hqq": {"bits": 4, "compute_dtype": "bf16"}, "hqq-2": {"bits": 2, "compute_dtype": "bf16"}}
LINEAR_WEIGHTS = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)  # tiny llama: q, o; k, v (2 kv heads); gate, up, down


@pytest.fixture(scope="module")
def rows_more():
    return {name: list(U.run_unit(make_unit(name.split("-2")[0], opts, cells=((4, 1),)))) for name, opts in MORE.items()}


@pytest.mark.parametrize("name", MORE)
def test_more_quantization_libraries_run_on_cpu(rows_more, rows_by_precision, name, tmp_path):
    r = rows_more[name][0]
    assert r["status"] == "ok", r.get("traceback")
    Store(tmp_path, "r").write(r)
    assert r["params"] == rows_by_precision["fp32"][1]["params"]  # counted by the unpacked shape
    assert r["quant_library"] == name.split("-")[0] and r["quant_config"]
    assert r["quant_scheme"] == ("weight+activation" if name == "torchao-int8dq" else "weight-only")
    assert (r.get("quantize_s", 0) > 0) == name.startswith("hqq")


def test_more_quantization_libraries_store_what_they_claim(rows_more, rows_by_precision):
    """Bytes saved on the linear layers against bf16 (2 bytes per weight), per library's layout."""
    bf16 = rows_by_precision["bf16"][0]["weights_bytes"]
    saved = {name: (bf16 - rows[0]["weights_bytes"]) / LINEAR_WEIGHTS for name, rows in rows_more.items()}
    for name in ("torchao-int8wo", "torchao-int8dq", "torchao-fp8wo", "quanto-int8"):
        assert 0.9 < saved[name] <= 1.0, (name, saved[name])    # 1 byte per weight, plus per-row scales
    # torchao's CPU int4 (IntxWeightOnlyConfig) keeps each 4-bit value in a byte: no smaller than int8
    assert saved["torchao-int4wo"] <= saved["torchao-int8wo"]
    assert "IntxWeightOnlyConfig" in rows_more["torchao-int4wo"][0]["quant_config"]
    # quanto and hqq pack 4-bit values two to a byte, 2-bit four to a byte
    assert 1.3 < saved["quanto-int4"] < 1.5 and 1.3 < saved["hqq"] < 1.5, saved
    assert saved["quanto-int2"] > saved["quanto-int4"] and saved["hqq-2"] > saved["hqq"]


def test_double_quant_shrinks_the_scales():
    """nf4-dq stores absmax in 8 bits (plus a 1 KB code book per layer): smaller once layers are not tiny."""
    wide = {**TINY_LLAMA, "hidden_size": 256, "ffn": 1024}
    stats = {name: tiny(name, wide).weight_stats() for name in ("nf4", "nf4-dq")}
    assert stats["nf4-dq"]["weights_bytes"] < stats["nf4"]["weights_bytes"]
    assert stats["nf4-dq"]["params"] == stats["nf4"]["params"]


def test_unsupported_device_gives_skipped_rows(monkeypatch):
    cuda_only = dataclasses.replace(REGISTRY["nf4"], limits=dataclasses.replace(REGISTRY["nf4"].limits,
                                                                                 devices=("cuda",)))
    monkeypatch.setitem(U.REGISTRY, "nf4", cuda_only)
    rows = list(U.run_unit(make_unit("nf4")))
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert "does not run on cpu" in rows[0]["error_message"]
    assert REGISTRY["bf16"].unsupported_reason("cuda", REGISTRY["bf16"].parse_options({}), bf16_ok=False)


def test_load_failure_makes_every_cell_an_error(tmp_path):
    rows = list(U.run_unit(make_unit(model=ModelSpec("path", str(tmp_path / "missing"), "missing"))))
    assert [r["status"] for r in rows] == ["error", "error"]
    assert rows[0]["error_type"] and rows[0]["traceback"]


def test_cell_failure_does_not_stop_the_unit(monkeypatch):
    real = latency.measure_cell

    def flaky(model, device, **kw):
        if kw["batch_size"] == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, device, **kw)

    monkeypatch.setattr(U.latency, "measure_cell", flaky)
    rows = list(U.run_unit(make_unit()))
    assert [r["status"] for r in rows] == ["oom", "ok"]  # the unit goes on with its other cells
    assert rows[0]["error_type"] == "RuntimeError" and "Tried to allocate" in rows[0]["error_message"]


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_memory_run_starts_without_earlier_runs_caches(monkeypatch, warmup):
    """No earlier run's KV cache may still be referenced during the memory run, or every peak counts one KV cache
    twice (Llama-2-7B, 1024 tokens x 16: 31.4 GB for 22.4 GB of weights + cache). Memory is
    read in the last warm-up run (with none, in a run after the timed ones). On CPU the allocator cannot tell, so
    check that no earlier run's cache is alive when any run starts, the memory run's included."""
    import weakref

    real, earlier, alive, memory_runs = hf_loop.generate, [], [], []

    def watched(module, ids, new_tokens, clock=None, phases=None, step=None, kv=None, cache=None):
        alive.extend(r() is not None for r in earlier)
        if phases is not None:
            memory_runs.append(len(earlier))
        assert cache is None  # eager: every run makes its own
        tokens, cache = real(module, ids, new_tokens, clock=clock, phases=phases, step=step, kv=kv)
        earlier.append(weakref.ref(cache))
        return tokens, cache

    monkeypatch.setattr(hf_loop, "generate", watched)
    rows = list(U.run_unit(make_unit(cells=((5, 2),), warmup=warmup)))
    row = rows[0]
    assert row["status"] == "ok", row.get("traceback")
    assert len(earlier) == max(warmup, 1) + 2  # the warm-ups (or one memory run) and 2 timed runs
    assert memory_runs == ([warmup - 1] if warmup else [2])  # the last warm-up, else after the 2 timed runs
    assert not any(alive)
    assert len(row["warmup_runs_s"]) == warmup and row["warmup_s"] == pytest.approx(sum(row["warmup_runs_s"]))
    assert row["memory_measured_in"] == ("the last warm-up run" if warmup else "a run after the timed runs")
    assert (row.get("memory_run_s") is not None) == (warmup == 0)
    assert row["kv_cache_bytes"] > 0 and row["kv_cache_tensor_bytes"] > 0


def test_opt_family_and_synthetic_cache(model_cache):
    rows = list(U.run_unit(make_unit("fp16", model=ModelSpec("synthetic", TINY_OPT, "opt"), cells=((3, 1),))))
    assert rows[0]["status"] == "ok"
    folders = list(model_cache.glob("synthetic-*"))
    assert folders and all((f / "config.json").exists() for f in folders)
    assert not list(model_cache.glob("*.tmp-*"))


def test_latency_record_summary_by_hand():
    rec = latency.LatencyRecord(batch_size=2, new_tokens=4)
    rec.add([10.0, 1.0, 2.0, 3.0])
    rec.add([12.0, 1.0, 2.0, 3.0])
    s = rec.summary()
    assert s["ttft_ms"] == 11.0 and s["decode_ms_per_token"] == 2.0 and s["decode_ms_p50"] == 2.0
    assert s["decode_tokens_per_s"] == pytest.approx(1000.0)
    assert s["e2e_s"] == pytest.approx(0.017) and s["e2e_s_samples"] == pytest.approx([0.016, 0.018])
    assert s["cv_decode"] == 0.0 and s["cv_ttft"] == pytest.approx(1.41421356 / 11, rel=1e-6)
    assert s["noisy_timing"] is True  # ttft varies by 13%
    assert len(s["decode_ms_samples"]) == 6
    assert s["decode_host_ms_per_token"] is None  # no host gaps recorded
    rec.add([10.0, 1.0, 2.0, 3.0], [0.3, 1.0, 1.0, 1.0])  # the host issued each step well ahead of the GPU
    rec.add([12.0, 1.0, 2.0, 3.0], [0.3, 0.5, 0.5, 0.5])  # (its first interval is the prefill's, not counted)
    assert rec.summary()["decode_host_ms_per_token"] == 0.75


def test_bandwidth_table():
    assert datasheet_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350
    assert datasheet_bandwidth_gbs("NVIDIA H100 PCIe") == 2000
    assert datasheet_bandwidth_gbs("NVIDIA H200") == 4800
    assert datasheet_bandwidth_gbs("NVIDIA A100-SXM4-40GB") == 1555
    assert datasheet_bandwidth_gbs("NVIDIA A100-SXM4-80GB") == 2039
    assert datasheet_bandwidth_gbs("Tesla T4") == 320
    assert datasheet_bandwidth_gbs("NVIDIA L4") == 300
    assert datasheet_bandwidth_gbs("NVIDIA A10G") == 600
    assert datasheet_bandwidth_gbs("Some Future GPU") is None


@pytest.mark.slow
def test_smollm2_unit_with_perplexity(wikitext_bytes, smollm2, model_cache):
    """The real model through the whole unit: GGUF converted once (cached by hash), perplexity on real text."""
    ppl = PerplexitySpec("gptq", 512, 512, 2, 2, "local", "x")
    rows = list(U.run_unit(make_unit("int8", {"compute_dtype": "fp32"}, model=ModelSpec("gguf", SMOLLM2, "smol"),
                                     cells=((4, 1),), ppl=ppl), wikitext_bytes))
    r = rows[0]
    assert r["status"] == "ok", r.get("traceback")
    assert r["model_source"] == "gguf" and len(r["model_file_sha256"]) == 64
    assert len(list(model_cache.glob("gguf-*"))) == 1
    assert "Q4_1" in r["weights_note"]
    assert 10 < r["perplexity"] < 60 and r["ppl_windows"] == 2 and r["ppl_tokens_scored"] == 2 * 511
    assert r["params"] == 134_515_008
    assert 1.0 < r["bits_per_param"] < 16  # int8 linear layers, fp32 embeddings


@pytest.mark.parametrize("name,billions", [("opt-125m", 0.125), ("opt-350m", 0.331), ("opt-1.3b", 1.316),
                                           ("llama-2-7b", 6.738), ("mistral-7b", 7.242)])
def test_synthetic_architectures_have_their_published_size(name, billions):
    """Built on the meta device: the named shapes give the published parameter counts."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(sources.synthetic_config(name))
    assert sum(p.numel() for p in m.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)


def test_a_compiled_cell_runs_every_generation_in_one_static_cache(monkeypatch):
    """CUDA graphs are recorded over the static cache's addresses: a compiled cell (compile run, warm-ups, memory run,
    timed runs) generates in one StaticCache, emptied between runs, never a new one per run (on an H200 each new one
    cost a re-recording at its run's first step, 40-1200 ms, inside the timed runs). Here the step is the plain eager
    one (no compiler on the path): what is checked is which cache every run gets, and that the tokens do not change."""
    import torch

    model = tiny()
    made, seen = [], []
    new_cache = hf_loop.new_cache

    def spy_new_cache(module, kv=None, static_len=None):
        made.append(static_len)
        return new_cache(module, kv, static_len)

    def step(module, token, cache, positions):
        seen.append((id(cache), cache.layers[0].keys.data_ptr()))
        return hf_loop.decode_one_token(module, token, cache, positions)

    monkeypatch.setattr(hf_loop, "new_cache", spy_new_cache)
    monkeypatch.setattr(hf_loop, "compiled_decode_step", lambda device: step)
    m = latency.measure_cell(model, "cpu", new_tokens=4, batch_size=2, prompt_tokens=8, warmup=2, repeats=3,
                             decode="compiled", profile=True)
    assert made == [8 + 4]  # one static cache for the cell: at the edge of memory a second would not fit
    # compile run, 2 warm-ups, 3 timed runs (3 steps each), then the profiled step's 3
    assert len(seen) == (1 + 2 + 3) * 3 + 3 and len(set(seen)) == 1 and m.kernels
    assert m.memory.cache_bytes == 2 * 2 * 2 * 16 * (8 + 4) * 2 * 4 and len(m.record.decode_ms) == 3
    assert m.counters == {"cudagraph_skips": None}  # CUDA graphs are asked for on GPUs only
    # the host's gaps are read at the same marks: on CPU the host clock is the device clock, gap for gap
    assert [len(h) for h in m.record.decode_host_ms] == [3, 3, 3] and m.record.decode_host_ms == m.record.decode_ms
    monkeypatch.undo()
    ids = latency.prompt_ids(None, model.vocab_size, 8, 2, "cpu")
    eager, _ = hf_loop.generate(model.module, ids, 4)
    static = hf_loop.new_cache(model.module, None, 12)
    for _ in range(2):  # emptied in place between generations: the same tokens each time
        tokens, cache = hf_loop.generate(model.module, ids, 4, step=step, cache=static)
        assert cache is static and torch.equal(tokens, eager)
    keys = static.layers[0].keys.data_ptr()
    gen = model.generation(ids, 4, "eager", None)
    gen.static = static  # the energy loop's prefills, into the cell's static cache
    gen.prefill_only()
    assert static.layers[0].keys.data_ptr() == keys and static.get_seq_length() == 8


def test_decode_starts_from_an_idle_gpu_and_the_host_clock_restarts_there(monkeypatch):
    """A run's decode steps are issued only after the GPU has finished the prefill (one sync after the prefill's
    event), and the host's first decode gap is counted from there: else the GPU ran the first steps from the
    prefill's queue while a slower host fell behind (torchao-int4wo's host 4.0 ms a step, its GPU 3.1, and
    the cell's figure the GPU's). The order of a run's calls, and the clock's GPU side with the sync spied."""
    import torch

    calls = []

    class Spy(hf_loop.Clock):
        def mark(self):
            calls.append("mark")
            super().mark()

        def decode_starts(self):
            calls.append("decode_starts")
            super().decode_starts()

    model = tiny()
    ids = latency.prompt_ids(None, model.vocab_size, 8, 1, "cpu")
    hf_loop.generate(model.module, ids, 4, clock=Spy("cpu"))
    assert calls == ["mark", "mark", "decode_starts", "mark", "mark", "mark"]  # prefill, then 3 decode steps

    synced, now = [], iter([7.0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synced.append(True))
    monkeypatch.setattr(hf_loop.time, "perf_counter", lambda: next(now))
    gpu = hf_loop.Clock("cpu")
    gpu.cuda, gpu.host = True, [1.0, 2.0]  # the host's reads at the run's start and after issuing the prefill
    gpu.decode_starts()
    assert synced == [True] and gpu.host == [1.0, 7.0]  # the prefill's interval ends when the GPU is done
    cpu = hf_loop.Clock("cpu")
    cpu.host = [1.0, 2.0]
    cpu.decode_starts()  # nothing is queued on CPU: one clock, left as read
    assert cpu.host == [1.0, 2.0] and synced == [True]


def test_other_processes_on_the_unit_s_cpus_are_counted_over_the_timed_runs(monkeypatch):
    """/proc/stat's busy ticks on the CPUs the process may use, less its own CPU time, over the timed runs' wall time
    (host-paced decode moves with them: tasks/host_cpu.py). By hand: the parsing (only the listed CPUs' lines; idle
    and iowait are not busy), the arithmetic, the mean over all runs and the busiest stretch (short runs counted
    together up to 0.25 s: a 10 ms tick per CPU is too much of a tiny model's run, where CI read 4 of 2 CPUs), the
    bounds; then a real cell's columns."""
    from tasks import host_cpu

    stat = ("cpu  900 0 900 9000 0 0 0 0 0 0\n"
            "cpu0 100 5 50 1000 40 3 2 10 7 0\n"      # busy 100+5+50+3+2+10 = 170 ticks (guest 7 is in user)
            "cpu1 999 999 999 0 0 0 0 0 0 0\n"       # not the process's
            "cpu2 30 0 20 500 0 0 0 0\n"              # busy 50 (an older kernel's shorter line)
            "intr 12345 0 0\nctxt 999\n")
    assert host_cpu.busy_seconds(stat, {0, 2}, 100) == pytest.approx(2.2)
    assert host_cpu.other_busy_cpus(busy_s=3.0, own_cpu_s=1.0, wall_s=0.5) == pytest.approx(4.0)
    assert host_cpu.other_busy_cpus(busy_s=0.9, own_cpu_s=1.0, wall_s=0.5) == 0.0  # rounding, never below 0
    assert host_cpu.other_busy_cpus(1.0, 0.0, 0.0) is None

    tracker = host_cpu.HostCpu()
    assert tracker.available  # Linux, as CI
    tracker.cpus = set(range(8))  # as on a larger host: the readings are made up
    reads = iter([(10.0, 5.0, 100.0), (12.0, 5.5, 101.0),    # run 1: 2 s busy, 0.5 own, 1 s: 1.5 CPUs
                  (20.0, 6.0, 200.0), (29.0, 7.0, 203.0)])   # run 2: 9 s busy, 1 own, 3 s: 2.67 CPUs
    monkeypatch.setattr(tracker, "_read", lambda: next(reads))
    for _ in range(2):
        with tracker.run():
            pass
    cols = tracker.columns()
    assert cols["host_other_busy_cpus"] == pytest.approx((11 - 1.5) / 4)  # both runs together
    assert cols["host_other_busy_cpus_max"] == pytest.approx(8 / 3) and cols["host_cpus"] == 8
    tracker.spans += [(0.5, 0.1, 0.1)] * 3 + [(0.8, 0.0, 0.1)]  # four runs of 0.1 s: one stretch of 0.4 s
    cols = tracker.columns()
    assert cols["host_other_busy_cpus_max"] == pytest.approx((2.3 - 0.3) / 0.4)
    assert cols["host_other_busy_cpus"] == pytest.approx((13.3 - 1.8) / 4.4)
    tracker.spans = [(100.0, 0.0, 1.0)]  # never more than the unit's CPUs
    assert tracker.columns()["host_other_busy_cpus_max"] == tracker.columns()["host_other_busy_cpus"] == 8
    tracker.spans = [(0.5, 0.1, 0.1)] * 2  # 0.2 s in all: too short to tell, empty
    assert tracker.columns() == {"host_cpus": 8}
    monkeypatch.undo()

    import os

    monkeypatch.setattr(host_cpu, "MIN_SPAN_S", 0.0)  # this tiny cell's runs take milliseconds: count each
    # a run's span lasts until its device marks are read (a GPU's host returns from a run while its steps still
    # run: a compiled 7B's cell spanned 0.13 s of its runs' 1.3 s and had no figure)
    tracked, read_inside = [], []
    track = host_cpu.HostCpu.run

    @contextlib.contextmanager
    def spied(self):
        with track(self):
            tracked.append(True)
            yield
            tracked.pop()

    intervals = hf_loop.Clock.intervals_ms
    probe, probed_inside = host_cpu.probe_ms, []
    monkeypatch.setattr(host_cpu, "probe_ms", lambda: probed_inside.append(bool(tracked)) or probe())
    monkeypatch.setattr(host_cpu.HostCpu, "run", spied)
    monkeypatch.setattr(hf_loop.Clock, "intervals_ms", lambda self: read_inside.append(bool(tracked))
                        or intervals(self))
    m = latency.measure_cell(tiny(), "cpu", new_tokens=3, batch_size=1, prompt_tokens=4, warmup=0, repeats=3)
    assert read_inside == [True] * 3 and len(m.record.decode_ms) == 3
    cpus = len(os.sched_getaffinity(0))
    assert m.host_cpu["host_cpus"] == cpus
    assert 0 <= m.host_cpu["host_other_busy_cpus"] <= m.host_cpu["host_other_busy_cpus_max"] <= cpus
    # the host's pace probed once before the timed runs and once after, outside every run's span
    assert probed_inside == [False, False]
    assert 0 < m.host_cpu["host_probe_before_ms"] < 1e4 and 0 < m.host_cpu["host_probe_after_ms"] < 1e4


@pytest.mark.slow
def test_local_folder_source(smollm2, model_cache):
    """A `path:` source is a plain Hugging Face folder (here: the converted GGUF in the cache)."""
    folder = next(model_cache.glob("gguf-*"))
    rows = list(U.run_unit(make_unit("fp32", model=ModelSpec("path", str(folder), "local"), cells=((2, 1),))))
    assert rows[0]["status"] == "ok" and rows[0]["model_source"] == "path" and rows[0]["params"] == 134_515_008


@pytest.mark.slow
def test_torchao_unwrap_drops_the_per_weight_python_work_of_a_compiled_step_and_changes_no_number(model_cache):
    """torchao's weights are tensor subclasses: a compiled step evaluates a Python metadata guard and flattens each one
    on every call (the host work that makes torchao-int4wo's compiled decode host-bound on an H200).
    `unwrap: true` makes them parametrizations of plain tensors: no guard and no flatten a step, the same tokens (eager
    and compiled), the same parameters and bytes, and the row says so."""
    import cProfile
    import pstats

    import torch

    p = REGISTRY["torchao-int4wo"]
    spec = ModelSpec("synthetic", TINY_LLAMA, "tiny")
    wrapped, unwrapped = (hf.load(spec, p, p.parse_options({"group_size": 32, **extra}), "cpu")
                          for extra in ({}, {"unwrap": True}))
    assert wrapped.weight_stats() == unwrapped.weight_stats()
    assert unwrapped.facts["quant_config"].endswith("+ unwrap_tensor_subclass") and "quantize_s" in unwrapped.facts
    assert "quantize_s" not in wrapped.facts and unwrapped.facts["linear_class"] == "ParametrizedLinear"
    ids = latency.prompt_ids(None, wrapped.vocab_size, 8, 2, "cpu")
    eager, _ = hf_loop.generate(wrapped.module, ids, 5)
    guards = {}
    for name, model in (("wrapped", wrapped), ("unwrapped", unwrapped)):
        assert torch.equal(hf_loop.generate(model.module, ids, 5)[0], eager)
        step = hf_loop.compiled_decode_step("cpu")
        assert torch.equal(hf_loop.generate(model.module, ids, 5, step=step)[0], eager)  # compiles, then 4 steps
        profiler = cProfile.Profile()
        profiler.enable()
        hf_loop.generate(model.module, ids, 5, step=step)
        profiler.disable()
        guards[name] = sum(v[1] for (_, _, fn), v in pstats.Stats(profiler).stats.items() if fn == "metadata_checker")
    assert guards == {"wrapped": 4 * 14, "unwrapped": 0}  # 4 steps x 14 quantized linear weights (2 layers x 7)


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens_and_its_own_columns(model_cache):
    """decode: compiled = StaticCache + torch.compile of decode_one_token: the same greedy tokens as eager, compile
    time in compile_s (never in the latency), a static cache allocated for every position."""
    import torch

    model = tiny()
    ids = latency.prompt_ids(None, 1000, 8, 2, "cpu")
    eager, _ = hf_loop.generate(model.module, ids, 6)
    step = hf_loop.compiled_decode_step("cpu")
    compiled, cache = hf_loop.generate(model.module, ids, 6, step=step)
    assert torch.equal(eager, compiled) and type(cache).__name__ == "StaticCache"
    again, same = hf_loop.generate(model.module, ids, 6, step=step, cache=cache)  # emptied and reused, as a cell's runs do
    assert same is cache and torch.equal(eager, again)

    unit = make_unit(cells=((5, 2),))
    unit.cells[0] = dataclasses.replace(unit.cells[0], decode="compiled")
    r = list(U.run_unit(unit))[0]
    assert r["status"] == "ok", r.get("traceback")
    assert r["decode"] == "compiled" and r["compile_s"] > 0 and r["measurement_version"] == 4
    assert r["cudagraph_skips"] is None  # CUDA graphs are asked for on GPUs only
    assert r["compile_s"] > 20 * max(r["decode_ms_samples"]) / 1e3  # compilation is not in the samples
    assert len(r["decode_ms_samples"]) == 2 * (5 - 1)
    # a static cache holds prompt + new_tokens positions from the start
    assert r["kv_cache_tensor_bytes"] == r["kv_cache_bytes"] == 2 * 2 * 2 * 16 * (8 + 5) * 2 * 4


def test_profile_lists_the_top_operators_of_one_decode_step(tmp_path):
    r = list(U.run_unit(make_unit("nf4", cells=((4, 1),), profile=True)))[0]
    assert r["status"] == "ok", r.get("traceback")
    k = r["top_kernels"]
    assert 3 <= len(k) <= 10 and [x["time_us"] for x in k] == sorted((x["time_us"] for x in k), reverse=True)
    assert all(x["calls"] >= 1 for x in k) and any(x["name"].startswith("aten::") for x in k)
    assert any("bitsandbytes" in x["name"] or "dequantize" in x["name"] for x in k), [x["name"] for x in k]
    Store(tmp_path, "r").write(r)  # the list of structs fits the Parquet schema
    # off by default: nothing profiled, the timings untouched
    assert list(U.run_unit(make_unit("nf4", cells=((4, 1),))))[0].get("top_kernels") is None
