"""Calibrated methods (gptq, awq) and the KV-cache axis, on CPU: calibration cached on disk and never on the test
split, packed weights counted, quantized caches measured against their analytic size, perplexity through a cache,
and the fork server's preload list free of libraries that touch CUDA at import."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.untrusted import BadInput
from orchestrator.grid import load_grid
from orchestrator.plan import make_plan, unsupported_cells
from common.catalog import RANDOM_IDS
from common.schema import NAMES
from common.units import Calibration, CellSpec, KvSpec, ModelSpec
from orchestrator.store import Store
from tasks import perplexity, unit as U
from tasks.precisions.gptq.calibration import calibration_ids
from tests.conftest import ROOT, SHARED, SMOLLM2, WIKITEXT, write_grid
from tests.test_measurements import make_unit

# AWQ's clip search takes output channels 64 at a time: every projection here is a multiple of 64
TINY64 = {"family": "llama", "hidden_size": 128, "layers": 2, "heads": 2, "kv_heads": 1, "ffn": 256, "vocab": 1000}
VALID = SHARED / "data" / "wikitext-2" / "wiki.valid.tokens"


def calibrated_unit(name, **options):
    u = make_unit(name, {"group_size": 64, "calib_samples": 4, "calib_seqlen": 32, **options},
                  model=ModelSpec("synthetic", TINY64, "tiny64"), cells=((4, 1),))
    u.precision = dataclasses.replace(u.precision, calibration=Calibration(RANDOM_IDS))
    return u


@pytest.mark.slow
@pytest.mark.parametrize("name,kernel", [("gptq", "TorchAtenLinear"), ("awq", "TorchAtenAwqLinear")])
def test_calibrated_method_runs_and_is_cached(name, kernel, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = list(U.run_unit(calibrated_unit(name)))[0]
    assert first["status"] == "ok", first.get("traceback")
    # gptqmodel's per-layer log lands beside the checkpoint, not in ./logs of wherever the sweep started
    assert not (tmp_path / "logs").exists()
    assert list((Path(first["calibrated_folder"]) / "calibration-log").glob(f"{name}_log_*.log"))
    assert first["calibration_cached"] is False and first["calibration_s"] > 0
    assert first["calib_text"] == RANDOM_IDS and first["calib_samples"] == 4 and first["calib_seqlen"] == 32
    assert first["linear_class"] == kernel and first["quant_library"] == "gptqmodel"
    # packed int32 buffers: the projections count by their logical shape, 4-bit values plus group scales
    fp32 = list(U.run_unit(make_unit("fp32", model=ModelSpec("synthetic", TINY64, "tiny64"), cells=((4, 1),))))[0]
    assert first["params"] == fp32["params"]
    assert first["weights_bytes"] < fp32["weights_bytes"] / 2.5
    again = list(U.run_unit(calibrated_unit(name)))[0]  # a second sweep: loaded from the cache, no calibration
    assert again["status"] == "ok" and again["calibration_cached"] is True
    assert again["calibration_s"] == first["calibration_s"] and again["calibrated_folder"] == first["calibrated_folder"]
    changed = list(U.run_unit(calibrated_unit(name, calib_samples=5)))[0]  # other options: calibrated anew
    assert changed["calibration_cached"] is False and changed["calibrated_folder"] != first["calibrated_folder"]
    assert set(first) <= set(NAMES)
    Store(tmp_path, "r").write(first)


def test_shapes_that_do_not_fit_the_groups_are_a_clear_error():
    u = calibrated_unit("gptq")
    u.model = ModelSpec("synthetic", {**TINY64, "hidden_size": 96, "heads": 3}, "tiny96")
    r = list(U.run_unit(u))[0]
    assert r["status"] == "error"
    assert "gptq: group_size 64 does not divide the model's hidden_size 96" in r["error_message"]
    u = calibrated_unit("awq", group_size=32)
    u.model = ModelSpec("synthetic", {**TINY64, "hidden_size": 96, "heads": 3}, "tiny96")
    r = list(U.run_unit(u))[0]
    assert "awq: the model's hidden_size 96 is not a multiple of 64" in r["error_message"]


def test_what_failed_on_an_h200_is_skipped_before_start(tmp_path, capsys):
    """Seen in the methods sweep on an H200: 4-bit GPTQ with kernel auto (gptqmodel picks Machete on compute
    capability 9.0) refuses SmolLM2's 576- and 192-wide projections while the model is built; Marlin layers (AWQ
    with kernel auto, GPTQ with kernel marlin) and quanto-int4 break torch.compile; compiled torchao-int8dq calls
    torch._int_mm with one row per sequence, which CUDA refuses up to 16. Known from the grid, the model's widths
    and the GPU type; on CPU all run."""
    from orchestrator.cli import main
    from orchestrator.model_info import model_widths
    from orchestrator.plan import unsupported_before_start

    assert model_widths(ModelSpec("gguf", SMOLLM2, "s")) == {"hidden_size": 576, "intermediate_size": 1536,
                                                        "kv projection width": 192}
    assert model_widths(ModelSpec("synthetic", "llama-2-7b", "l")) == {"hidden_size": 4096, "intermediate_size": 11008,
                                                         "kv projection width": 4096}
    from transformers import LlamaConfig  # a local folder: read from its config.json, grouped-query k/v width
    LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3).save_pretrained(
        tmp_path / "local")
    assert model_widths(ModelSpec("path", str(tmp_path / "local"), "p")) == {"hidden_size": 576, "intermediate_size": 1536,
                                                                "kv projection width": 192}
    path = write_grid(tmp_path / "g.yaml", f"""
name: h200
models: [{{gguf: "{SMOLLM2}", label: smollm2}}, {{synthetic: llama-2-7b}}]
precisions:
  - {{name: gptq, group_size: 64, calib_path: {VALID}}}
  - {{name: gptq, group_size: 64, kernel: torch, calib_path: {VALID}}}
  - {{name: gptq, group_size: 64, kernel: marlin, calib_path: {VALID}}}
  - {{name: gptq, bits: 3, group_size: 64, calib_path: {VALID}}}
  - {{name: awq, group_size: 64, calib_path: {VALID}}}
  - {{name: awq, group_size: 64, kernel: torch, calib_path: {VALID}}}
  - quanto-int4
  - quanto-int2
  - torchao-int8dq
generation: {{new_tokens: [4], batch_sizes: [1, 32], decode: [eager, compiled]}}
perplexity: false
""")
    plan = make_plan(load_grid(path), "r")
    label = {u.unit_id: (u.model.label, u.label.split(" × ")[1]) for u in plan.units}
    on_h200 = unsupported_before_start(plan, "cuda", ["H200"])
    assert [label[k] for k in on_h200] == [("smollm2", "gptq(group_size=64)")]
    assert "Machete" in on_h200[next(iter(on_h200))] and "`kernel: torch`" in on_h200[next(iter(on_h200))]
    assert unsupported_before_start(plan, "cuda", ["A100"]) == {}  # Machete is for 9.0 only
    assert unsupported_before_start(plan, "cpu", []) == {}
    cells = {c.key: c for c in plan.cells}
    unit_of = {c.key: label[u.unit_id][1] for u in plan.units for c in u.cells}
    skipped = unsupported_cells(plan, "cuda")
    assert {(unit_of[k], cells[k].decode, cells[k].batch_size) for k in skipped} == {
        (p, "compiled", b) for p in ("awq(group_size=64)", "gptq(group_size=64,kernel=marlin)", "quanto-int4")
        for b in (1, 32)} | {("torchao-int8dq", "compiled", 1)}
    assert "torch._int_mm" in next(r for k, r in skipped.items() if unit_of[k] == "torchao-int8dq")
    assert unsupported_cells(plan, "cpu") == {}
    assert main(["validate", str(path), "--gpu", "H200"]) == 0
    out = capsys.readouterr().out
    assert "smollm2 × gptq(group_size=64): gptq: with kernel auto" in out
    assert "skipped before start (4 cells): decode: compiled (CUDA graphs) is not available for awq" in out


def test_machete_without_its_sources_is_refused_before_calibrating(monkeypatch):
    """Seen on an H200 without internet: 4-bit GPTQ with kernel auto loads with Machete, which downloads CUTLASS from
    GitHub at first use; the load failed after calibrating. The worker now says so before calibrating."""
    from tasks.precisions.gptq.calibration import machete_problem
    from tasks.precisions import REGISTRY

    opts = REGISTRY["gptq"].parse_options({})
    for var in ("GPTQMODEL_CUTLASS_DIR", "GPTQMODEL_MACHETE_PRECOMPILED_LIBRARY"):
        monkeypatch.delenv(var, raising=False)
    offline = machete_problem("gptq", opts, (9, 0), reachable=lambda: False)
    assert "github.com cannot be reached" in offline and "`kernel: marlin`" in offline
    assert machete_problem("gptq", opts, (9, 0), reachable=lambda: True) is None  # online: gptqmodel fetches it
    assert machete_problem("gptq", opts, (8, 0), reachable=lambda: False) is None  # not Machete below 9.0
    assert machete_problem("gptq", REGISTRY["gptq"].parse_options({"kernel": "marlin"}), (9, 0),
                           reachable=lambda: False) is None
    assert machete_problem("gptq", REGISTRY["gptq"].parse_options({"bits": 3}), (9, 0), reachable=lambda: False) is None
    monkeypatch.setenv("GPTQMODEL_CUTLASS_DIR", "/opt/cutlass")  # a checkout named: gptqmodel builds from it
    assert machete_problem("gptq", opts, (9, 0), reachable=lambda: False) is None


@pytest.mark.slow
def test_calibration_windows_come_from_the_text(smollm2):
    _, tok = smollm2
    text = VALID.read_bytes()
    samples = calibration_ids(text, tok, tok.vocab_size, samples=3, seqlen=16)
    assert [len(s["input_ids"]) for s in samples] == [16, 16, 16]
    decoded = tok.decode(samples[0]["input_ids"])
    assert decoded.strip() and decoded.strip()[:20] in text.decode()  # real text, not random ids
    assert samples == calibration_ids(text, tok, tok.vocab_size, samples=3, seqlen=16)  # seeded


def _calibrated_grid(tmp_path, calib_path):
    return write_grid(tmp_path / "g.yaml", f"""
name: calib
models: [{{gguf: "{SMOLLM2}", label: smol}}]
precisions: [fp32, {{name: gptq, group_size: 64, calib_path: "{calib_path}"}}]
generation: {{new_tokens: [4]}}
perplexity: false
""")


def test_calibration_text_is_read_checked_and_keyed_by_content(tmp_path):
    grid = load_grid(_calibrated_grid(tmp_path, VALID))
    plan = make_plan(grid, "r")
    gptq = next(u for u in plan.units if u.precision.name == "gptq")
    assert gptq.precision.calibration.name == str(VALID.resolve())
    task = gptq.to_task(plan)
    assert task.precision.calibration.text == VALID.read_bytes()  # shipped with the unit: no copy needed on workers
    assert gptq.precision.label == "gptq(group_size=64)"  # the file is on the row, not in the label
    copy = tmp_path / "same-text.tokens"
    copy.write_bytes(VALID.read_bytes())
    moved = make_plan(load_grid(_calibrated_grid(tmp_path, copy)), "r")
    assert [c.key for c in moved.cells] == [c.key for c in plan.cells]  # same text elsewhere: same cells


def test_calibrating_on_the_test_split_is_refused(tmp_path):
    with pytest.raises(BadInput, match=r"precisions\[1\]\.calib_path: .* is the WikiText-2 test split"):
        make_plan(load_grid(_calibrated_grid(tmp_path, WIKITEXT)), "r")


def test_calibration_text_is_required_offline_for_real_models(tmp_path, monkeypatch):
    monkeypatch.delenv("WIKITEXT2_VALID_PATH", raising=False)
    grid = load_grid(write_grid(tmp_path / "g.yaml", f"""
name: calib
models: [{{gguf: "{SMOLLM2}"}}]
precisions: [gptq]
generation: {{new_tokens: [4]}}
perplexity: false
"""))
    with pytest.raises(BadInput, match=r"precisions\[0\]\.calib_path: no calibration text is set"):
        make_plan(grid, "r")
    monkeypatch.setenv("WIKITEXT2_VALID_PATH", str(VALID))
    assert make_plan(grid, "r").units[0].precision.calibration.sha256
    synthetic = load_grid(write_grid(tmp_path / "s.yaml", """
name: calib
models: [{synthetic: opt-125m}]
precisions: [gptq]
generation: {new_tokens: [4]}
perplexity: false
"""))
    monkeypatch.delenv("WIKITEXT2_VALID_PATH")
    assert make_plan(synthetic, "r").units[0].precision.calibration.name == RANDOM_IDS  # no text needed


KV = ["native", "quanto-int4", "quanto-int2", "hqq-int8", "hqq-int4", "hqq-int2"]


@pytest.mark.slow
def test_kv_cache_axis_measured_and_analytic_agree():
    u = make_unit("fp32", model=ModelSpec("synthetic", TINY64, "tiny64"))
    quantized = {"q_group_size": 64, "residual_length": 16}
    u.cells = [CellSpec(name, 40, 2, kv=KvSpec(name, {} if name == "native" else quantized, name), prompt_tokens=8)
               for name in KV]
    rows = {r["kv_cache"]: r for r in U.run_unit(u)}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("traceback") for r in rows.values()]
    for name, r in rows.items():
        # the cache's own tensors (packed values, scales, zero points, residual) against the geometry
        assert r["kv_cache_tensor_bytes"] == pytest.approx(r["kv_cache_bytes"], abs=1), name
        assert r["kv_bytes_per_token"] == r["kv_cache_tensor_bytes"] / ((8 + 40 - 1) * 2)
        assert json.loads(r["kv_cache_options"]) == ({} if name == "native" else
                                                     {"q_group_size": 64, "residual_length": 16})
    native = rows["native"]["kv_bytes_per_token"]
    assert native == 2 * 2 * 1 * 64 * 4  # K and V x layers x kv_heads x head_dim x fp32
    assert rows["hqq-int2"]["kv_bytes_per_token"] < rows["hqq-int4"]["kv_bytes_per_token"] \
        < rows["hqq-int8"]["kv_bytes_per_token"] < native / 2
    assert rows["quanto-int4"]["kv_bytes_per_token"] == rows["hqq-int4"]["kv_bytes_per_token"]


def test_quantized_cache_with_compiled_decode_is_skipped_before_start(tmp_path, capsys):
    from orchestrator.cli import main

    grid = load_grid(write_grid(tmp_path / "g.yaml", """
name: kv
models: [{synthetic: opt-125m}]
precisions: [fp16]
generation: {new_tokens: [4], decode: [eager, compiled], kv_cache: [native, {name: hqq-int4, residual_length: 64}]}
perplexity: false
"""))
    plan = make_plan(grid, "r")
    assert sorted((c.decode, c.kv.label) for c in plan.cells) == [
        ("compiled", "hqq-int4(residual_length=64)"), ("compiled", "native"),
        ("eager", "hqq-int4(residual_length=64)"), ("eager", "native")]
    skipped = unsupported_cells(plan)
    assert [(c.decode, c.kv.name) for c in plan.cells if c.key in skipped] == [("compiled", "hqq-int4")]
    assert "needs a static cache" in next(iter(skipped.values()))
    assert main(["validate", str(tmp_path / "g.yaml")]) == 0  # validate lists them
    assert "skipped before start (1 cell): kv_cache hqq-int4 with decode: compiled" in capsys.readouterr().out
    # a grid without the axis keeps the keys it had: native cells do not depend on kv settings
    plain = make_plan(load_grid(write_grid(tmp_path / "p.yaml", """
name: kv
models: [{synthetic: opt-125m}]
precisions: [fp16]
generation: {new_tokens: [4], decode: [eager, compiled]}
perplexity: false
""")), "r")
    assert {c.key for c in plain.cells} == {c.key for c in plan.cells if c.kv.name == "native"}


def test_unknown_kv_cache_is_named(tmp_path):
    path = write_grid(tmp_path / "g.yaml", """
name: kv
models: [{synthetic: opt-125m}]
precisions: [fp16]
generation: {new_tokens: [4], kv_cache: [native, hqq-int5]}
""")
    with pytest.raises(BadInput, match=r"generation\.kv_cache\[1\].*unknown kv_cache 'hqq-int5'; did you mean"):
        load_grid(path)


@pytest.mark.slow
def test_perplexity_through_a_quantized_cache(smollm2, wikitext_bytes):
    """kv-continuation on SmolLM2's real weights: 2-bit keys and values cost more than 4-bit ones, which cost little;
    the native cache gives the same numbers as one forward pass over the same tokens."""
    import math

    import torch
    import torch.nn.functional as F

    model, tok = smollm2
    rows = perplexity.rows_from_raw(wikitext_bytes)

    def ppl(name):
        kv = None if name == "native" else KvSpec(name, {"q_group_size": 64, "residual_length": 16}, name)
        return perplexity.continuation_perplexity(model, tok, rows, kv=kv, windows=2, prefill=64, continuation=48,
                                                  device="cpu")

    native, int4, int2 = ppl("native"), ppl("hqq-int4"), ppl("hqq-int2")
    assert native["ppl_kv_tokens_scored"] == 96 and native["ppl_kv_prefill_tokens"] == 64
    ids = perplexity.token_ids(tok, perplexity.corpus_text(rows))[:2 * 112].view(2, 112)
    with torch.no_grad():
        logits = model.module(input_ids=ids).logits[:, 63:-1].float()
    exact = math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 64:].reshape(-1)).item())
    assert native["ppl_kv"] == pytest.approx(exact, rel=1e-3)
    assert native["ppl_kv"] < int4["ppl_kv"] < int2["ppl_kv"]
    assert int4["ppl_kv"] < native["ppl_kv"] * 1.15


@pytest.mark.slow
def test_fork_server_preload_leaves_cuda_alone():
    """Found on the GPU host: transformers.modeling_utils imports torchao (and hqq) when installed, and torchao's import
    reads the GPU's compute capability, initialising CUDA in the fork server; every unit then failed with "Cannot
    re-initialize CUDA in forked subprocess". Nothing the fork server preloads may import those libraries."""
    code = ("import sys; import tasks.unit as U\n"
            "U.import_preload()\n"
            "print([m for m in U.NEVER_PRELOAD + U.CUINIT_ON_IMPORT if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    found = subprocess.run([sys.executable, "-c", "import sys, transformers.modeling_utils; "
                            "print('torchao' in sys.modules)"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert found.stdout.strip().splitlines()[-1] == "True"  # why modeling_utils is not preloaded


def test_extra_preload_leaves_out_what_touches_the_gpu(monkeypatch):
    from tasks.unit import extra_preload

    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    assert extra_preload("") == ()
    assert extra_preload(" sympy, torch._dynamo ,,torchao, torchao.quantization, transformers.modeling_utils") == (
        "sympy", "torch._dynamo")
    # on a GPU host a child forked after these cannot use the GPU
    cuinit = "torch._inductor.compile_fx,torch._inductor.lowering,transformers.cache_utils"
    assert extra_preload(cuinit) == ()
    # unless torch asks NVML, not the CUDA driver, whether there is a GPU; the libraries stay out either way
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    assert extra_preload(cuinit + ",torchao,bitsandbytes") == (
        "torch._inductor.compile_fx", "torch._inductor.lowering", "transformers.cache_utils")


def _modules_after_unit(unit):
    """Run a unit as a sweep does (tasks.unit:run_unit_alone in a child of the fork server) and return its rows and
    which quantization libraries the child had imported by the end (a stand-in runner wraps the real one)."""
    from orchestrator import forkserver

    proc, recv = forkserver.start("tests.test_methods:_run_and_report_modules", unit, None)
    rows = list(forkserver.rows(proc, recv))
    return [r for r in rows if "_modules" not in r], next(r["_modules"] for r in rows if "_modules" in r)


def _run_and_report_modules(unit, wikitext=None):
    import sys

    yield from U.run_unit_alone(unit, wikitext)
    yield {"_modules": sorted(m for m in ("torchao", "hqq", "bitsandbytes") if m in sys.modules)}


@pytest.mark.slow
def test_a_unit_alone_imports_only_the_libraries_it_uses():
    """transformers imports torchao and hqq with modeling_utils whenever they are installed (2.2 of a unit's import
    seconds on this CPU, more on a GPU host): a unit in a process of its own leaves out those it does not use, and
    one that uses them (a torchao precision, an hqq KV cache) still measures."""
    rows, modules = _modules_after_unit(make_unit("fp16", model=ModelSpec("synthetic", TINY64, "tiny64"),
                                                          cells=((4, 1),)))
    assert [r["status"] for r in rows] == ["ok"] and modules == []
    rows, modules = _modules_after_unit(make_unit("nf4", model=ModelSpec("synthetic", TINY64, "tiny64"),
                                                          cells=((4, 1),)))
    assert [r["status"] for r in rows] == ["ok"] and modules == ["bitsandbytes"]
    u = make_unit("torchao-int8wo", model=ModelSpec("synthetic", TINY64, "tiny64"))
    u.cells = [CellSpec("hqq", 8, 1, kv=KvSpec("hqq-int4", {"q_group_size": 64, "residual_length": 16}, "hqq-int4"),
                        prompt_tokens=8)]
    rows, modules = _modules_after_unit(u)
    assert [r["status"] for r in rows] == ["ok"], rows[0].get("traceback")
    assert modules == ["hqq", "torchao"]


def test_a_missing_library_names_the_extra_that_installs_it(monkeypatch):
    """Found from installed distributions' metadata: a precision or KV cache whose library is absent is skipped with
    the pip line that brings it; the core's own (torch) never is."""
    import importlib.metadata

    from common.catalog import kv_reason
    from tasks.precisions import REGISTRY

    real = importlib.metadata.version
    absent = {"hqq", "optimum-quanto", "gptqmodel"}

    def version(name):
        if name in absent:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert REGISTRY["hqq"].method.missing() == "hqq is not installed: pip install -e '.[hqq]'"
    assert REGISTRY["gptq"].method.missing() == ("gptqmodel is not installed: pip install -e '.[gptq]' and pip "
                                                 "install --no-deps gptqmodel==7.6.0 (scripts/setup.sh --test does both)")
    assert REGISTRY["fp16"].method.missing() is None and REGISTRY["nf4"].method.missing() is None
    assert kv_reason("quanto-int4", "eager") == ("kv_cache quanto-int4 needs optimum-quanto, not installed: "
                                                 "pip install -e '.[quanto]'")
    assert kv_reason("native", "eager") is None
