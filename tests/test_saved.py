"""A checkpoint saved quantized, measured as precision `saved` of its unquantized model: its folder is checked before
start, it is skipped where it cannot stand for the model, and both engines load it as saved, with the model's
tokenizer, their rows saying what it is."""
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from common.units import CellSpec, GenerationSpec, ModelSpec, PrecisionSpec, UnitSpec
from orchestrator.cli import main
from tasks.precisions import REGISTRY
from tasks.precisions.saved import stored_bits
from tests.conftest import SMOLLM2

# a small model with SmolLM2's vocabulary, so that its tokenizer serves it
SMALL = {"family": "llama", "hidden_size": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 49152}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(model folder, its bitsandbytes nf4 save, a copy of the save without its quantization_config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tasks.sources import gguf_folder, synthetic_folder

    root = tmp_path_factory.mktemp("saved")
    model = root / "small"
    shutil.copytree(synthetic_folder(SMALL, "cpu")[0], model)
    AutoTokenizer.from_pretrained(gguf_folder(SMOLLM2)[0]).save_pretrained(model)
    q = AutoModelForCausalLM.from_pretrained(model, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    q.save_pretrained(root / "small-nf4")
    plain = root / "plain"
    shutil.copytree(root / "small-nf4", plain)
    config = json.loads((plain / "config.json").read_text())
    del config["quantization_config"]
    (plain / "config.json").write_text(json.dumps(config))
    return model, root / "small-nf4", plain


def validate(root: Path, precision: str, capsys, model: str = "path: ./small"):
    grid = root / "grid.yaml"
    grid.write_text(textwrap.dedent(f"""
        name: saved
        models: [{{{model}}}]
        precisions: [fp32, {precision}]
        generation: {{new_tokens: [4], batch_sizes: [1], prompt_tokens: 8, warmup: 0, repeats: 1}}
        perplexity: false
    """))
    code = main(["validate", str(grid)])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_saved_checkpoint_is_a_precision_of_its_model(folders, capsys):
    model, saved, _ = folders
    code, out, err = validate(model.parent, "{name: saved, path: ./small-nf4}", capsys)
    assert code == 0, err
    assert "small × saved(path=small-nf4): 1 cells" in out and "skipped" not in out


@pytest.mark.parametrize("path,expected", [
    (None, "precisions[1].path: saved loads a checkpoint saved quantized: name its folder"),
    ("./nowhere", "precisions[1].path: {root}/nowhere is not a folder"),
    ("./plain", "precisions[1].path: {root}/plain/config.json has no quantization_config")])
def test_a_folder_that_is_not_a_saved_checkpoint_is_refused(folders, capsys, path, expected):
    root = folders[0].parent
    code, out, err = validate(root, f"{{name: saved, path: {path}}}" if path else "saved", capsys)
    assert code == 2 and "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error")]
    assert len(lines) == 1 and expected.format(root=root) in lines[0], err


def test_it_cannot_stand_for_a_synthetic_model_or_another_one(folders, capsys):
    root = folders[0].parent
    code, out, _ = validate(root, "{name: saved, path: ./small-nf4}", capsys, "synthetic: llama-2-7b")
    assert code == 0 and "saved: a checkpoint saved quantized is of a real model; this model is synthetic" in out
    other = root / "other"
    shutil.copytree(folders[0], other, dirs_exist_ok=True)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    code, out, _ = validate(root, "{name: saved, path: ./small-nf4}", capsys, "path: ./other")
    assert code == 0 and "has num_hidden_layers 2, the model 3: not a checkpoint of this model" in out


def test_a_compressed_tensors_checkpoint_decodes_eager_under_transformers(folders, capsys):
    """Its layers stop torch.compile (seen on an H100 and on CPU): compiled cells are skipped with the reason, on
    transformers only; a checkpoint of another format compiles."""
    root = folders[0].parent
    ct = root / "small-ct"
    shutil.copytree(folders[1], ct, dirs_exist_ok=True)
    config = json.loads((ct / "config.json").read_text())
    group = {"weights": {"num_bits": 4, "type": "int", "group_size": 64}, "targets": ["Linear"]}
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                     "config_groups": {"group_0": group}}
    (ct / "config.json").write_text(json.dumps(config))
    grid = root / "decode.yaml"
    grid.write_text(textwrap.dedent("""
        name: saved-decode
        models: [{path: ./small}]
        precisions: [fp32, {name: saved, path: ./small-nf4}, {name: saved, path: ./small-ct}]
        generation: {new_tokens: [4], batch_sizes: [1], prompt_tokens: 8, decode: [eager, compiled]}
        perplexity: false
    """))
    assert main(["validate", str(grid)]) == 0
    out = capsys.readouterr().out
    skipped = [x for x in out.splitlines() if x.startswith("skipped before start")]
    assert skipped == ["skipped before start (1 cell): decode: compiled is not available for saved: transformers' "
                       "compressed-tensors layers do not trace under torch.compile; use decode: eager"], out


def test_stored_bits_come_from_the_checkpoints_config():
    w4a16 = {"quant_method": "compressed-tensors",
             "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int"}, "targets": ["Linear"]}}}
    assert stored_bits(w4a16) == 4
    assert stored_bits({"quant_method": "gptq", "bits": 8}) == 8
    assert stored_bits({"quant_method": "bitsandbytes", "load_in_4bit": True}) == 4
    assert stored_bits({"quant_method": "fp8", "activation_scheme": "dynamic"}) == 8
    assert stored_bits({"quant_method": "something new"}) == 16


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_both_engines_load_it_as_saved(folders, fake_vllm, engine):
    from tasks import unit as U

    model, saved, _ = folders
    p = REGISTRY["saved"]
    options = p.parse_options({"path": str(saved)}).model_dump()
    u = UnitSpec("s", "r", "u", ModelSpec("path", str(model), "small"), PrecisionSpec("saved", options, "saved"),
                 [CellSpec("k", 4, 1, "eager", prompt_tokens=8)], GenerationSpec(warmup=0, repeats=2), None, gpus=0,
                 engine=engine)
    rows = list(U.run_unit(u))
    assert rows[0]["status"] == "ok", rows[0].get("traceback")
    r = rows[0]
    assert r["weight_bits_nominal"] == 4 and r["quant_scheme"] == "as saved"
    assert r["linear_class"] == ("Linear4bit" if engine == "hf" else "BitsAndBytesLinearMethod")
    assert "saved bitsandbytes" in r["quant_config"]
    if engine == "vllm":
        assert fake_vllm.MADE[0]["model"] == str(saved)  # the save is served; the tokenizer stays the model's


def test_a_packed_compressed_tensors_layer_is_named_so():
    """compressed-tensors keeps nn.Linear and replaces its weight by weight_packed and weight_scale."""
    import torch

    from tasks.engines.hf import linear_class

    class ToyDecoderLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.o_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
            del self.q_proj.weight
            self.q_proj.weight_packed = torch.nn.Parameter(torch.zeros(8, 1, dtype=torch.int32), requires_grad=False)

    assert linear_class(torch.nn.Sequential(ToyDecoderLayer())) == "Linear,Linear(packed)"
