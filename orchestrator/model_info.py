"""What the driver knows about a model entry without loading it: whether its source can be reached, its size (to
order units), its projection widths (for methods whose groups or kernels cannot take some) and its context length.
Read from the synthetic catalogue, a local folder's config.json, a GGUF file's metadata, or a hub model's cached
config. Nothing here imports torch."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

from common.untrusted import BadInput, read_regular_file
from orchestrator.headers import CONFIG_CAP, fingerprint, gguf_header, parse_json, read_config
from common.models import projection_widths, resolve_file, saved_quantization, synthetic_shapes, widths_of
from common.units import ModelSpec

HUB_HINT = ("point at a local copy instead: `path:` a Hugging Face model folder (config.json and weights), or "
            "`gguf:` a GGUF file")


def hub_offline() -> bool:
    """True when the Hugging Face hub cannot be used: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or no answer from
    huggingface.co within 3 s."""
    import socket

    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return False
    except OSError:
        return True


def _hub_cached(model: ModelSpec) -> Path | None:
    """A hub model's config.json in the local Hugging Face cache (its folder is the snapshot's commit), if there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model.location, "config.json", revision=model.revision,
                                       cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except Exception:  # a malformed id: the worker's loader names it
        return None
    return Path(found) if isinstance(found, str) else None


def _hub_config(model: ModelSpec) -> dict | None:
    found = _hub_cached(model)
    if found is None:
        return None
    config = parse_json(read_regular_file(found, CONFIG_CAP, "hub config"), "hub config", str(found))
    return config if isinstance(config, dict) else None


def check_source(model: ModelSpec, where: str, offline: bool | None = None) -> None:
    """BadInput naming `where` (e.g. models[0]) when the source cannot be loaded: a folder without config.json, a
    missing or irregular GGUF file, a `pkg:` path that leaves its package, a hub model while the hub is out of reach
    and the model is not in the local cache."""
    if model.source == "path":
        folder = Path(model.location)
        if not folder.is_dir():
            raise BadInput(f"{where}.path: {folder} is not a folder; a Hugging Face model folder (config.json and "
                           f"weights) is needed")
        if not (folder / "config.json").is_file():
            raise BadInput(f"{where}.path: {folder} has no config.json; a Hugging Face model folder (config.json and "
                           f"weights) is needed")
        saved_quantized(read_config(folder, f"{where}.path"), f"{where}.path", folder)
    elif model.source == "gguf":
        try:
            file = resolve_file(model.location)
        except (FileNotFoundError, ValueError) as e:
            raise BadInput(f"{where}.gguf: {e}") from None
        if not file.is_file():
            raise BadInput(f"{where}.gguf: {file} is not a file" if file.exists() else
                           f"{where}.gguf: {file} does not exist")
        gguf_header(file, f"{where}.gguf")
    elif model.source == "hub":
        config = _hub_config(model)
        if (hub_offline() if offline is None else offline) and config is None:
            raise BadInput(f"{where}.hub: {model.location} is not in the local Hugging Face cache and the hub is out "
                           f"of reach (HF_HUB_OFFLINE or no network); {HUB_HINT}")
        if config is not None:
            saved_quantized(config, f"{where}.hub", model.location)


def saved_quantized(config: dict, where: str, source) -> None:
    """A checkpoint saved quantized (its config carries a quantization_config: compressed-tensors, GPTQ, AWQ, fp8)
    loads quantized whatever precision a cell names, in either engine: its rows would measure the saved
    quantization under that precision's name. Refused: a model entry is the unquantized model."""
    method = saved_quantization(config)
    if method is not None:
        raise BadInput(f"{where}: {source} is saved quantized ({method}: its config.json has a "
                       f"quantization_config), and would load quantized under every precision's name; point at "
                       f"the unquantized model and measure this folder as precision {{name: saved, path: ...}}")


def identify(model: ModelSpec, where: str) -> ModelSpec:
    """The model entry with its weights' fingerprint (orchestrator.headers.fingerprint; a hub model: the cached
    snapshot's commit), which is part of every cell key: a model replaced in place is a new model."""
    if model.source in ("path", "gguf"):
        location = str(resolve_file(model.location)) if model.source == "gguf" else model.location
        found = fingerprint(model.source, location, f"{where}.{model.source}")
    elif model.source == "hub":
        cached = _hub_cached(model)
        found = cached.parent.name if cached is not None else None
    else:
        found = None
    return dataclasses.replace(model, fingerprint=found)


def _config(model: ModelSpec) -> dict | None:
    if model.source == "path":
        c = read_config(Path(model.location), "path")
    elif model.source == "hub":
        c = _hub_config(model)
    else:
        return None
    return c.get("text_config", c) if c else None


def model_config(model: ModelSpec) -> dict | None:
    """A model entry's config.json as a mapping (a folder's, or a cached hub model's), None where there is none or it
    cannot be read."""
    try:
        return _config(model)
    except Exception:  # unreadable: check_source named it already
        return None


def context_length(model: ModelSpec) -> int | None:
    """Positions the model can hold (max_position_embeddings or the GGUF context length), None where unknown."""
    try:
        if model.synthetic:
            s = synthetic_shapes(model.location)
            return s.get("max_positions", 2048 if s["family"] == "opt" else 4096)
        if model.source == "gguf":
            return _gguf_meta(str(resolve_file(model.location)))[3]
        c = _config(model)
        return (c.get("max_position_embeddings") or c.get("n_positions")) if c else None
    except Exception:  # unreadable: the worker's loader says why
        return None


def model_shape(model: ModelSpec) -> tuple[float, int]:
    """(parameters, layers) of a model entry, roughly, without loading it: only to order units."""
    if model.synthetic:
        s = synthetic_shapes(model.location)
        kv = (s.get("kv_heads") or s["heads"]) / s["heads"]
        per_layer = s["hidden_size"] ** 2 * (2 + 2 * kv) + 3 * s["hidden_size"] * s["ffn"]
        return s["layers"] * per_layer + s["vocab"] * s["hidden_size"], s["layers"]
    try:
        if model.source == "gguf":
            params, layers, _, _ = _gguf_meta(str(resolve_file(model.location)))
            return params, layers or 24
        if model.source == "path":
            p = Path(model.location)
            config = read_config(p, "path")
            size = sum(f.stat().st_size for f in p.glob("*.safetensors"))
            return size / 2, int(config.get("num_hidden_layers", 24))
    except Exception:  # an unreadable source fails later, in its unit, with its own message
        pass
    return 1e9, 24


def model_widths(model: ModelSpec) -> dict[str, int] | None:
    """Projection widths of a model entry without loading it (hidden, MLP, k/v), None where unknown (hub ids)."""
    try:
        if model.synthetic:
            s = synthetic_shapes(model.location)
            return projection_widths(s["hidden_size"], s["ffn"], s["heads"], s.get("kv_heads"))
        if model.source == "gguf":
            return dict(_gguf_meta(str(resolve_file(model.location)))[2]) or None
        if model.source == "path":
            return widths_of(SimpleNamespace(**_config(model)))  # config.json keys are the attributes
    except Exception:  # an unreadable source fails later, in its unit, with its own message
        pass
    return None


def _gguf_meta(path: str) -> tuple[float, int | None, tuple, int | None]:
    """(parameters, layers, projection widths, context length) from a GGUF file's metadata."""
    head = gguf_header(Path(path), "gguf")
    meta = head["metadata"]
    arch = meta.get("general.architecture")

    def field(name: str) -> int | None:
        v = meta.get(f"{arch}.{name}")
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    hidden, heads = field("embedding_length"), field("attention.head_count")
    widths = projection_widths(hidden, field("feed_forward_length"), heads, field("attention.head_count_kv"),
                               field("attention.key_length")) if hidden and heads else {}
    return (float(sum(n for _, n in head["tensors"])), field("block_count"), tuple(widths.items()),
            field("context_length"))
