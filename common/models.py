"""What a model entry is, without loading it: the synthetic architectures, where a `pkg:` file lies, and the shapes
read from a config (projection widths, KV geometry). Configs are duck-typed: transformers' objects, or config.json's
fields as attributes."""
from __future__ import annotations

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


def synthetic_shapes(spec: str | dict) -> dict[str, Any]:
    return dict(SYNTHETIC_ARCHITECTURES[spec]) if isinstance(spec, str) else dict(spec)


def resolve_file(path: str) -> Path:
    """A file path, or `pkg:PACKAGE/relative/path` for a file shipped inside an installed distribution. Found through
    the installed distributions' metadata (their RECORD of files), never by importing anything: a grid runs no code.
    The file must be one its distribution lists, and may not leave the package's folder."""
    if not path.startswith("pkg:"):
        return Path(path).expanduser()
    package, _, rel = path[4:].partition("/")
    if not package.isidentifier() or not rel:
        raise ValueError(f"{path}: expected pkg:PACKAGE/relative/path, with PACKAGE an installed package's import name")
    from importlib import metadata

    wanted = f"{package}/{rel}"
    for dist_name in metadata.packages_distributions().get(package, []):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        for f in dist.files or []:
            if str(f).replace("\\", "/") == wanted:
                root = Path(dist.locate_file(package)).resolve()
                file = Path(dist.locate_file(f)).resolve()
                if root not in file.parents:
                    raise ValueError(f"{path} leaves the package {package} (it names {file})")
                return file
        raise FileNotFoundError(f"{path}: the installed distribution {dist_name} has no file {wanted}")
    raise FileNotFoundError(f"{path}: no installed distribution provides the package {package!r}")


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


def saved_quantization(config) -> str | None:
    """The quantization a checkpoint was saved with (its config's quantization_config: a mapping, or an object as
    transformers' AutoConfig holds it), by its quant_method; None for an unquantized checkpoint. Such a source loads
    quantized whatever precision a cell names."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(method or "unnamed method")[:40]

