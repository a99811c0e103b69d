"""What a model entry is, without loading it: the synthetic architectures, where a `pkg:` file lies, and the shapes
read from a config (projection widths, KV geometry). Configs are duck-typed: transformers' objects, or config.json's
fields as attributes."""
from __future__ import annotations

import importlib.util
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
    """A file path, or `pkg:PACKAGE/relative/path` for a file shipped inside an installed package (found without
    importing the package, whose own imports may be missing); a `pkg:` path may not leave its package."""
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
