"""A checkpoint saved quantized from the model (compressed-tensors from llm-compressor, GPTQ, AWQ, fp8, a
transformers bitsandbytes save): either engine loads it as saved, in place of the model's weights, and picks its
kernels from its config's quantization_config. The model's own weights stay the baseline's and its tokenizer cuts the
windows and prompts, so the distance is the saved quantization's. The folder must be of the same architecture and
vocabulary as the model (checked before start); what it was quantized from is the user's word."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from common.untrusted import MiB, read_regular_file
from tasks.precisions.base import Limits, Loading, LoadPlan, Method, Options, Precision, Served

# bits of a stored weight by quant_method, where the config does not say (fp8: one byte)
FORMAT_BITS = {"fp8": 8.0}


class SavedOptions(Options):
    path: str | None = Field(None, json_schema_extra={"grid_path": True},
                             description="the saved checkpoint: a Hugging Face folder whose config.json has a "
                                         "quantization_config, relative to the grid file")


def _config(path: str | Path) -> dict:
    """The folder's config.json (BadInput where it is not a small regular file); {} where it is no mapping."""
    raw = json.loads(read_regular_file(Path(path) / "config.json", 1 * MiB, "path"))
    return raw if isinstance(raw, dict) else {}


def quantization_config(path: str | Path) -> dict:
    """The folder's quantization_config; {} if none."""
    q = _config(path).get("quantization_config")
    return q if isinstance(q, dict) else {}


def stored_bits(q: dict) -> float:
    """Nominal bits of a stored weight from a quantization_config: compressed-tensors' weight num_bits (the widest of
    its groups), GPTQ/AWQ `bits`, bitsandbytes 4 or 8, fp8 8; 16 where it names none."""
    groups = q.get("config_groups")
    if isinstance(groups, dict):
        bits = [g.get("weights", {}).get("num_bits") for g in groups.values() if isinstance(g, dict)]
        bits = [b for b in bits if isinstance(b, (int, float))]
        if bits:
            return float(max(bits))
    if isinstance(q.get("bits"), (int, float)):
        return float(q["bits"])
    if q.get("load_in_4bit"):
        return 4.0
    if q.get("load_in_8bit"):
        return 8.0
    return FORMAT_BITS.get(str(q.get("quant_method")), 16.0)


def _bits(o: SavedOptions) -> float:
    try:
        return stored_bits(quantization_config(o.path))
    except Exception:  # unreadable: the driver refused it before start, the unit fails on loading it
        return 16.0


def _plan(o: SavedOptions, device: str) -> LoadPlan:
    q = quantization_config(o.path)
    return LoadPlan({"dtype": "auto"}, f"saved {q.get('quant_method')} {json.dumps(q, sort_keys=True)[:400]}")


def model_reason(o: SavedOptions, synthetic: bool, model_config: dict | None) -> str | None:
    """Why the saved folder cannot stand for this model: a synthetic model (no checkpoint is saved from random
    weights), another architecture or vocabulary."""
    if synthetic:
        return "saved: a checkpoint saved quantized is of a real model; this model is synthetic"
    try:
        saved = _config(o.path)
    except Exception as e:
        return f"saved: {o.path}: {e}"
    if not model_config:
        return None
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        a, b = model_config.get(key), saved.get("text_config", saved).get(key)
        if a is not None and b is not None and a != b:
            return f"saved: {o.path} has {key} {b}, the model {a}: not a checkpoint of this model"
    return None


def compile_reason(o: SavedOptions) -> str | None:
    """Checkpoints whose transformers layers do not trace under torch.compile (measured: compressed-tensors 0.17 on an
    H100 and 0.19 on CPU stop Dynamo, packed 4-bit and fp8 alike)."""
    try:
        method = quantization_config(o.path).get("quant_method")
    except Exception:  # unreadable: refused before start
        return None
    if method == "compressed-tensors":
        return "transformers' compressed-tensors layers do not trace under torch.compile; use decode: eager"
    return None


METHOD = Method("checkpoint", scheme="as saved", weight_bits=_bits)

PRECISIONS = (
    Precision("saved", "a checkpoint saved quantized from the model (its config's quantization_config: "
                       "compressed-tensors, GPTQ, AWQ, fp8, bitsandbytes), loaded as saved",
              METHOD, Loading(SavedOptions, _plan, folder=lambda o: o.path),
              Limits(compile_reason=compile_reason, model_reason=model_reason),
              engines={"vllm": Served(lambda o: {"dtype": "auto"})}),
)
