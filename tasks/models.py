"""Model sources (hub id, local folder, GGUF file, synthetic architecture) and loading one at a precision.

Every source but the hub becomes a plain Hugging Face folder first, so that every precision is loaded the same way:
- a GGUF file is dequantized once by transformers (`gguf_file=`) and saved to a cache folder keyed by the file's
  sha256 (transformers refuses a quantization config together with `gguf_file`);
- a synthetic model (random weights, seed 0, in a named architecture or a mapping of shapes) is built once and saved
  to a cache folder keyed by its configuration.
The cache lives in $QSWEEP_CACHE, else ~/.cache/quant-sweep. Folders are written under a temporary name and renamed,
so two workers building the same folder at once cannot leave a half-written one.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# name -> shapes. OPT sizes from the OPT paper / facebook configs; Llama-2-7B and Mistral-7B from their configs.
SYNTHETIC_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "opt-125m": dict(family="opt", hidden_size=768, layers=12, heads=12, ffn=3072, vocab=50272, max_positions=2048),
    "opt-350m": dict(family="opt", hidden_size=1024, layers=24, heads=16, ffn=4096, vocab=50272, max_positions=2048,
                     embed_dim=512),
    "opt-1.3b": dict(family="opt", hidden_size=2048, layers=24, heads=32, ffn=8192, vocab=50272, max_positions=2048),
    "llama-2-7b": dict(family="llama", hidden_size=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32000,
                       max_positions=4096),
    "mistral-7b": dict(family="mistral", hidden_size=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=32000,
                       max_positions=32768),
}


def cache_root() -> Path:
    return Path(os.environ.get("QSWEEP_CACHE", Path.home() / ".cache" / "quant-sweep"))


def resolve_file(path: str) -> Path:
    """A file path, or `pkg:PACKAGE/relative/path` for a file shipped inside an installed package (found without
    importing the package, whose own imports may be missing)."""
    if path.startswith("pkg:"):
        package, _, rel = path[4:].partition("/")
        if not all(part.isidentifier() for part in package.split(".")):
            raise ValueError(f"{path}: {package!r} is not a package name")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {package!r} is not installed (needed for {path})")
        root = Path(spec.submodule_search_locations[0]).resolve()
        file = (root / rel).resolve()
        if root not in file.parents:
            raise ValueError(f"{path} leaves the package {package} (it names {file})")
        return file
    return Path(path).expanduser()


def synthetic_shapes(spec: str | dict) -> dict[str, Any]:
    if isinstance(spec, str):
        return dict(SYNTHETIC_ARCHITECTURES[spec])
    return dict(spec)


def synthetic_config(spec: str | dict):
    from transformers import LlamaConfig, MistralConfig, OPTConfig

    s = synthetic_shapes(spec)
    family = s["family"]
    if family == "opt":
        return OPTConfig(hidden_size=s["hidden_size"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         ffn_dim=s["ffn"], vocab_size=s["vocab"], max_position_embeddings=s.get("max_positions", 2048),
                         word_embed_proj_dim=s.get("embed_dim", s["hidden_size"]), bos_token_id=2, eos_token_id=2,
                         pad_token_id=1)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[family]
    return cls(hidden_size=s["hidden_size"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
               num_key_value_heads=s.get("kv_heads") or s["heads"], intermediate_size=s["ffn"],
               vocab_size=s["vocab"], max_position_embeddings=s.get("max_positions", 4096))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _publish(build, target: Path) -> Path:
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
    import torch
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

    return _publish(build, cache_root() / f"gguf-{sha[:16]}"), sha


def synthetic_folder(spec: str | dict, device: str) -> tuple[Path, str]:
    """A cached folder with random weights (seed 0, transformers' own init) in the given architecture."""
    import torch
    from transformers import AutoModelForCausalLM

    config = synthetic_config(spec)
    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        model.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"synthetic": spec}))

    return _publish(build, cache_root() / f"synthetic-{key}"), key


def source_folder(model: dict, device: str) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained finds the model, plus facts about the source for the row."""
    if model.get("hub"):
        return model["hub"], {"model_source": "hub", "model_revision": model.get("revision")}
    if model.get("path"):
        return str(Path(model["path"]).expanduser()), {"model_source": "path"}
    if model.get("gguf"):
        folder, sha = gguf_folder(model["gguf"])
        return str(folder), {"model_source": "gguf", "model_file_sha256": sha}
    folder, _ = synthetic_folder(model["synthetic"], device)
    return str(folder), {"model_source": "synthetic"}


def load(model: dict, precision, options, device: str, calibration: dict | None = None):
    """Load (model, tokenizer or None) at a precision onto `device`; returns them with load facts. `calibration`:
    {"text": bytes or None, "name": str} for calibrated precisions (gptq, awq)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    where, facts = source_folder(model, device)
    facts["prepare_s"] = time.perf_counter() - t0
    common = {"revision": model.get("revision")} if model.get("revision") else {}
    common["trust_remote_code"] = bool(model.get("trust_remote_code", False))
    source = where
    if precision.prepare is not None:  # calibrated methods load a cached calibrated checkpoint instead
        calibration = calibration or {}
        where, calib = precision.prepare(where, options, device, calibration.get("text"), calibration.get("name"),
                                         bool(model.get("synthetic")))
        facts.update(calib)
    t0 = time.perf_counter()
    kwargs = precision.build(options, device)
    facts.update(quant_config=kwargs.pop("_quant_config", None), quant_library=precision.library,
                 quant_library_version=library_version(precision.library),
                 quant_scheme=precision.scheme, weight_bits_nominal=float(precision.bits(options)))
    m = AutoModelForCausalLM.from_pretrained(where, device_map={"": device}, **kwargs, **common)
    m.eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    facts["load_s"] = time.perf_counter() - t0
    facts["linear_class"] = linear_class(m)
    if precision.after_load is not None:  # libraries that quantize a loaded model through their own API
        t0 = time.perf_counter()
        precision.after_load(m, options, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        facts["quantize_s"] = time.perf_counter() - t0
        facts["linear_class"] = linear_class(m)
    tokenizer = None
    if not model.get("synthetic"):
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    return m, tokenizer, facts


LIBRARY_DISTRIBUTIONS = {"bitsandbytes": "bitsandbytes", "torchao": "torchao", "quanto": "optimum-quanto",
                         "hqq": "hqq", "gptqmodel": "gptqmodel", "torch": "torch"}


def library_version(library: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(LIBRARY_DISTRIBUTIONS.get(library, library))
    except PackageNotFoundError:
        return None


def linear_class(model) -> str:
    """The module classes that run the first decoder layer's projections (which kernel path a method took), e.g.
    "Linear", "Linear4bit", "TorchAtenLinear", "HQQLinear" (after_load replaces them later: call again then)."""
    layers = next((m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")), model)
    names = {type(m).__name__ for n, m in layers.named_modules() if n and not list(m.children())
             and (hasattr(m, "weight") or hasattr(m, "qweight") or hasattr(m, "W_q"))
             and "norm" not in type(m).__name__.lower()}
    return ",".join(sorted(names))


def weight_stats(model) -> dict[str, Any]:
    """Logical parameter count (quantized tensors counted by their unpacked shape), bytes of every parameter and
    buffer as stored, effective bits per parameter, and the bytes of an input embedding a decode step does not read.

    Stored bytes follow each library's layout: bitsandbytes' quant_state (absmax, nested scales, code books) and SCB;
    tensor subclasses (torchao, quanto) by the plain tensors they flatten to, recursively (scales, zero points, packed
    data); HQQLinear by W_q plus the scale and zero tensors in its `meta`; gptqmodel's GPTQ/AWQ layers by their
    buffers (qweight, qzeros, scales, g_idx), their parameters counted by the layer's shape."""
    import math

    params = 0
    seen: dict[int, int] = {}  # data_ptr -> bytes: tensors shared between layers (code books) count once

    def add(t) -> None:
        for inner in _stored_tensors(t):
            seen.setdefault(inner.data_ptr(), inner.numel() * inner.element_size())

    hqq = {id(m.W_q): m for m in model.modules() if hasattr(m, "W_q") and isinstance(getattr(m, "meta", None), dict)}
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if id(p) in hqq:
            meta = hqq[id(p)].meta
            params += math.prod(meta["shape"])
            for t in _meta_tensors(meta):
                add(t)
        else:
            params += math.prod(qs.shape) if qs is not None else p.numel()
        add(p)
        if qs is not None:  # absmax, nested scales and code books
            for t in _quant_state_tensors(qs):
                add(t)
        scb = getattr(p, "SCB", None)
        if scb is not None:
            add(scb)
    for m in model.modules():  # gptqmodel's packed layers (GPTQ, AWQ): weights are int32 buffers, not parameters
        if "qweight" in getattr(m, "_buffers", {}) and hasattr(m, "in_features"):  # (quanto's qweight: a property)
            params += m.in_features * m.out_features
    for b in model.buffers():
        add(b)
    weights_bytes = sum(seen.values())
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and inp.weight.data_ptr() == out.weight.data_ptr()
    unread = 0 if tied else sum(t.numel() * t.element_size() for t in _stored_tensors(inp.weight))
    return {
        "params": params,
        "weights_bytes": weights_bytes,
        "bits_per_param": 8.0 * weights_bytes / params if params else None,
        "embedding_unread_bytes": unread,
    }


def _stored_tensors(t):
    """The plain tensors that hold a tensor's bytes: itself, or for a tensor subclass (torchao, quanto) the tensors it
    flattens to, recursively."""
    import torch

    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        yield t
        return
    names, _ = flatten()
    for name in names:
        yield from _stored_tensors(getattr(t, name))


def _meta_tensors(meta: dict):
    import torch

    for v in meta.values():
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, dict):  # quantized scales/zeros keep their own meta
            yield from _meta_tensors(v)


def _quant_state_tensors(qs):
    import torch

    seen = []
    for v in vars(qs).values():
        if isinstance(v, torch.Tensor):
            seen.append(v)
        elif v is not None and hasattr(v, "absmax"):
            seen.extend(_quant_state_tensors(v))
    return seen


def text_config(config):
    """The language model's part of a config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_geometry(config) -> dict[str, int]:
    """Layers, KV heads and head dimension, for the analytic KV-cache size."""
    text = text_config(config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {"layers": text.num_hidden_layers, "kv_heads": kv_heads, "head_dim": head_dim}


def projection_widths(hidden: int, intermediate: int | None, heads: int, kv_heads: int | None,
                      head_dim: int | None = None) -> dict[str, int]:
    """The widths a decoder's projections take and give: hidden size, MLP width, and the k/v projections' width."""
    kv = (kv_heads or heads) * (head_dim or hidden // heads)
    return {k: v for k, v in {"hidden_size": hidden, "intermediate_size": intermediate,
                              "kv projection width": kv}.items() if v}


def widths_of(config) -> dict[str, int]:
    text = text_config(config)
    return projection_widths(text.hidden_size, getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None),
                             text.num_attention_heads, getattr(text, "num_key_value_heads", None),
                             getattr(text, "head_dim", None))
