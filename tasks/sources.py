"""Model sources and their cache folders: every source but the hub becomes a plain Hugging Face folder first, so
that every precision is loaded the same way.
- a GGUF file is dequantized once by transformers (`gguf_file=`) and saved to a cache folder keyed by the file's
  sha256 (transformers refuses a quantization config together with `gguf_file`);
- a synthetic model (random weights, seed 0, in a named architecture or a mapping of shapes) is built once and saved
  to a cache folder keyed by its configuration.
The cache lives in $QSWEEP_CACHE, else ~/.cache/quant-sweep (common.cache). Folders are written under a temporary name and renamed,
so two workers building the same folder at once cannot leave a half-written one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.cache import cache_root
from common.models import resolve_file, saved_quantization, synthetic_shapes
from common.units import ModelSpec


def synthetic_config(spec: str | dict):
    from transformers import LlamaConfig, MistralConfig, OPTConfig

    s = synthetic_shapes(spec)
    if s["family"] == "opt":
        return OPTConfig(hidden_size=s["hidden_size"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         ffn_dim=s["ffn"], vocab_size=s["vocab"], max_position_embeddings=s.get("max_positions", 2048),
                         word_embed_proj_dim=s.get("embed_dim", s["hidden_size"]), bos_token_id=2, eos_token_id=2,
                         pad_token_id=1)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[s["family"]]
    return cls(hidden_size=s["hidden_size"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
               num_key_value_heads=s.get("kv_heads") or s["heads"], intermediate_size=s["ffn"],
               vocab_size=s["vocab"], max_position_embeddings=s.get("max_positions", 4096))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def publish(build, target: Path) -> Path:
    """Build a folder under a temporary name beside `target`, then rename it into place (first writer wins)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another worker published it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def gguf_folder(path: str) -> tuple[Path, str]:
    """A cached Hugging Face folder holding the dequantized weights and tokenizer of a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = resolve_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {file}")
    sha = sha256_file(file)

    def build(tmp: Path) -> None:
        kw = dict(gguf_file=file.name)
        tok = AutoTokenizer.from_pretrained(file.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(file.parent, dtype=torch.float32, **kw)
        del model.config.quantization_config          # the folder holds plain (dequantized) fp32 weights
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(file), "sha256": sha}))

    return publish(build, cache_root() / f"gguf-{sha[:16]}"), sha


def synthetic_folder(spec: str | dict, device: str) -> tuple[Path, str]:
    """A cached folder with random weights (seed 0, transformers' own init) in the given architecture."""
    from transformers import AutoModelForCausalLM

    config = synthetic_config(spec)
    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        model.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"synthetic": spec}))

    return publish(build, cache_root() / f"synthetic-{key}"), key


def refuse_saved_quantized(config, source: str) -> None:
    """A source saved quantized (its config carries a quantization_config) loads quantized under any precision's
    name: the unit fails. The driver refuses such a folder or cached hub model before start
    (orchestrator.model_info); this catches a hub model fetched only here."""
    method = saved_quantization(config)
    if method is not None:
        raise RuntimeError(f"{source} is saved quantized ({method}: its config has a quantization_config) and would "
                           f"load quantized under this precision's name; point at the unquantized model (and measure "
                           f"the saved one as precision saved)")


def source_folder(model: ModelSpec, device: str) -> tuple[str, dict[str, Any]]:
    """Where the loader finds the model (a hub id or a folder), plus facts about the source for the row."""
    if model.source == "hub":
        return model.location, {"model_source": "hub", "model_revision": model.revision}
    if model.source == "path":
        return str(Path(model.location).expanduser()), {"model_source": "path"}
    if model.source == "gguf":
        folder, sha = gguf_folder(model.location)
        return str(folder), {"model_source": "gguf", "model_file_sha256": sha}
    folder, _ = synthetic_folder(model.location, device)
    return str(folder), {"model_source": "synthetic"}
