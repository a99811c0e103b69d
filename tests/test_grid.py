"""Grid validation: every bad input gives one message naming the field, exit code 2, no traceback."""
import subprocess
import sys
import textwrap

import pytest

from orchestrator.cli import main
from common.untrusted import BadInput
from orchestrator.grid import load_grid
from tests.conftest import ROOT

GOOD = textwrap.dedent("""
    name: t
    models:
      - synthetic: {family: llama, hidden_size: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 128, vocab: 1000}
    precisions: [fp32, nf4]
    generation:
      new_tokens: [4, 8]
      batch_sizes: [1, 2]
    perplexity: false
    resources: {gpus_per_task: 0}
""")


def run_validate(tmp_path, text, *extra):
    f = tmp_path / "grid.yaml"
    f.write_text(text)
    return subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(f), *extra], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_good_grid_validates_and_prints_plan(tmp_path):
    r = run_validate(tmp_path, GOOD)
    assert r.returncode == 0, r.stderr
    assert "8 cells in 2 units" in r.stdout
    assert "on this machine: 0 GPU and " in r.stdout


BAD = [
    ("models: [\n  - x", "YAML syntax error", "grid.yaml:2:"),
    (GOOD.replace("new_tokens:", "new_token:"), "generation.new_token: unknown key; did you mean 'new_tokens'?", None),
    (GOOD.replace("batch_sizes: [1, 2]", "batch_sizes: [1, eight]"), "generation.batch_sizes[1]", "valid integer"),
    (GOOD.replace("new_tokens: [4, 8]", "new_tokens: []"), "generation.new_tokens", "at least 1 item"),
    (GOOD.replace("[fp32, nf4]", "[fp32, nf5]"), "precisions[1]: unknown precision 'nf5'; did you mean 'nf4'?", None),
    (GOOD.replace("[fp32, nf4]", "[fp32, {name: int8, treshold: 0}]"),
     "precisions[1].treshold: unknown key; did you mean 'threshold'?", None),
    (GOOD.replace("[fp32, nf4]", "[fp32, {name: nf4, compute_dtype: fp8}]"), "precisions[1].compute_dtype", None),
    (GOOD.replace("  - synthetic:", "  - hub: a/b\n    synthetic:"), "models[0]: needs exactly one source", "got hub, synthetic"),
    (GOOD.replace("  - synthetic: {family: llama, hidden_size: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 128, vocab: 1000}",
                  "  - label: nothing"), "models[0]: needs exactly one source", "got none"),
    (GOOD.replace("new_tokens: [4, 8]", "new_tokens: [4, -8]"), "generation.new_tokens[1]", "greater than 0"),
    (GOOD.replace("new_tokens: [4, 8]", "new_tokens: [0]"), "generation.new_tokens[0]", "greater than 0"),
    (GOOD.replace("layers: 2", "layers: 0"), "models[0].synthetic.layers", "greater than 0"),
    (GOOD.replace("perplexity: false", "perplexity: {protocol: gptx}"), "perplexity.protocol", "'gptq' or 'strided'"),
    (GOOD.replace("name: t", "name: t\nbaseline: int8"), "baseline 'int8' is not one of the precisions", None),
    (GOOD.replace("models:\n", "models:\n  - synthetic: opt-125m\n  - synthetic: opt-125m\n    label: b\n"),
     "models[1] is the same model as models[0]", None),
    (GOOD + "models_extra: 1\n", "models_extra: unknown key; did you mean 'models'?", None),
    ("- just\n- a list\n", "the grid must be a mapping", None),
    (GOOD.replace("name: t", "name: !!python/object/apply:os.system ['echo pwned']"), "YAML syntax error", None),
]


@pytest.mark.parametrize("text,expect,also", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_grid_one_message_exit_2(tmp_path, text, expect, also):
    r = run_validate(tmp_path, text)
    assert r.returncode == 2
    assert expect in r.stderr
    if also:
        assert also in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "pwned" not in r.stdout


def test_missing_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "grid file: " in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_sweep_bad_input_exit_2_before_ray(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text(GOOD.replace("[fp32, nf4]", "[fp33]"))
    assert main(["sweep", str(f)]) == 2


def test_set_overrides(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text(GOOD)
    g = load_grid(f, ["precisions=[fp16,{name: nf4, double_quant: true}]", "generation.repeats=2",
                      "perplexity.max_windows=8"])
    assert [p.label for p in g.precisions] == ["fp16", "nf4(double_quant=True)"]
    assert g.generation.repeats == 2
    assert g.perplexity.max_windows == 8 and g.perplexity.protocol == "gptq"
    with pytest.raises(BadInput, match="generation.repeat: unknown key; did you mean 'repeats'"):
        load_grid(f, ["generation.repeat=2"])
    with pytest.raises(BadInput, match="expected KEY=VALUE"):
        load_grid(f, ["generation.repeats"])


def test_trust_remote_code_off_by_default_and_paths_absolute(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text(GOOD.replace("  - synthetic: {family: llama, hidden_size: 64, layers: 2, heads: 4, kv_heads: 2, "
                              "ffn: 128, vocab: 1000}", "  - path: ./m\n  - hub: org/x\n    trust_remote_code: true"))
    g = load_grid(f)
    assert g.models[0].trust_remote_code is False and g.models[1].trust_remote_code is True
    assert g.models[0].spec(tmp_path).location == str(tmp_path / "m")
    assert g.baseline == "fp32"


def test_shipped_grids_validate():
    for name in ("grid.yaml", "examples/seed.yaml", "examples/gpu-one.yaml", "examples/gpu-llama7b.yaml"):
        g = load_grid(ROOT / name)
        assert g.models and g.precisions
