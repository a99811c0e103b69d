"""The transformers engine: a model loaded with AutoModelForCausalLM at a precision, and the calls the measurements
make, written out as plain steps (gpt-fast's spirit): `prefill` (the prompt, giving the first token) and
`decode_one_token` (one more token from the KV cache), greedy, `window_logits` for perplexity windows.

KV caches: transformers' DynamicCache in the model's dtype (native), a StaticCache of a fixed length (compiled
decode), or a QuantizedCache (KIVI-style: keys and values quantized per group of `q_group_size`, the newest tokens
in full precision in a residual of at most `residual_length - 1` tokens, re-quantized every `residual_length`
steps; the prompt is quantized at prefill already).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from spec.catalog import KV_CACHES
from spec.models import kv_geometry, text_config
from spec.units import KvSpec, ModelSpec
from tasks.sources import source_folder
from tasks.weights import stored_tensors, weight_stats


def prefill(module, input_ids, cache, cache_position=None):
    out = module(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                 cache_position=cache_position)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def decode_one_token(module, token, cache, cache_position=None):
    out = module(input_ids=token, past_key_values=cache, use_cache=True, cache_position=cache_position)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def compiled_decode_step(device: str):
    """`decode_one_token` through torch.compile (fullgraph; CUDA graphs on a GPU via "reduce-overhead"). Dynamo's
    caches are reset first, so each cell compiles for its own shapes and never hits the recompile limit (past it,
    torch.compile silently runs eager)."""
    torch._dynamo.reset()
    mode = "reduce-overhead" if device.startswith("cuda") else None
    return torch.compile(decode_one_token, fullgraph=True, dynamic=False, mode=mode)


def new_cache(module, kv: KvSpec | None = None, static_len: int | None = None):
    """DynamicCache, a StaticCache of `static_len` tokens (compiled decode), or a QuantizedCache."""
    from transformers import DynamicCache, QuantizedCache, StaticCache

    spec = KV_CACHES[kv.name] if kv else None
    if spec is not None:
        backend, bits = spec
        return QuantizedCache(backend=backend, config=module.config, nbits=bits, q_group_size=kv.options["q_group_size"],
                              residual_length=kv.options["residual_length"])
    if static_len:
        return StaticCache(config=module.config, max_cache_len=static_len)
    return DynamicCache(config=module.config)


def _hqq_meta_tensors(meta: dict):
    for v in meta.values():
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, dict):  # quantized scales/zeros keep their own meta
            yield from _hqq_meta_tensors(v)


def reset_cache(cache) -> None:
    """Empty a cache in place: a StaticCache keeps its tensors (zeroed, length 0), so CUDA graphs recorded over them
    replay; a new StaticCache's tensors land wherever the allocator puts them, and every graph over other addresses is
    recorded again (CUDA graph trees check the addresses of `mark_static_address` inputs; transformers marks them)."""
    cache.reset()


def cache_bytes(cache) -> int:
    """Bytes the cache holds: full-precision keys/values (the residual, for a quantized cache) plus the quantized
    states (quanto's packed tensor subclass flattened; HQQ's packed tensor plus the scale/zero in its meta)."""
    seen: dict[int, int] = {}

    def add(t) -> None:
        for inner in stored_tensors(t):
            if inner.numel():
                seen.setdefault(inner.data_ptr(), inner.numel() * inner.element_size())

    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                add(t)
            elif isinstance(t, tuple):  # HQQ: (packed tensor, meta)
                add(t[0])
                for m in _hqq_meta_tensors(t[1]):
                    add(m)
    return sum(seen.values())


def cache_element_size(cache) -> int | None:
    """Bytes of one element in the cache's full-precision part (the model's activation dtype)."""
    for layer in getattr(cache, "layers", []):
        t = getattr(layer, "keys", None)
        if t is not None and hasattr(t, "element_size"):
            return t.element_size()
    return None


def linear_class(module) -> str:
    """The module classes that run the first decoder layer's projections (which kernel path a method took), e.g.
    "Linear", "Linear4bit", "TorchAtenLinear", "HQQLinear"."""
    layers = next((m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")), module)
    names = {type(m).__name__ for n, m in layers.named_modules()
             if n and not [c for name, c in m.named_children() if name != "parametrizations"]  # unwrapped torchao
             and (hasattr(m, "weight") or hasattr(m, "qweight") or hasattr(m, "W_q"))
             and "norm" not in type(m).__name__.lower()}
    return ",".join(sorted(names))


def library_version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


@dataclass
class HFModel:
    """A loaded transformers model and the calls the measurements make (tasks.engines.Model)."""
    module: Any
    tokenizer: Any | None
    device: str
    storage: Any = None                        # the backend's storage rule (tasks.weights)
    facts: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.module.get_input_embeddings().weight.shape[0]

    @property
    def geometry(self) -> dict[str, int]:
        return kv_geometry(self.module.config)

    @property
    def max_positions(self) -> int | None:
        return getattr(text_config(self.module.config), "max_position_embeddings", None)

    def window_logits(self, ids):
        return self.module(input_ids=ids, use_cache=False).logits

    def window_hidden(self, ids):
        return self.module.base_model(input_ids=ids, use_cache=False).last_hidden_state

    def output_head(self):
        head = self.module.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def next_logits(self, ids, cache, positions=None):
        return self.module(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                           cache_position=positions).logits[:, -1]

    def prefill(self, ids, cache, positions=None):
        return prefill(self.module, ids, cache, positions)

    def decode_one_token(self, token, cache, positions=None):
        return decode_one_token(self.module, token, cache, positions)

    def compiled_decode(self):
        step = compiled_decode_step(self.device)
        return lambda token, cache, positions: step(self.module, token, cache, positions)

    def new_cache(self, kv: KvSpec | None = None, static_len: int | None = None):
        return new_cache(self.module, kv, static_len)

    def reset_cache(self, cache) -> None:
        reset_cache(cache)

    def cache_bytes(self, cache) -> int:
        return cache_bytes(cache)

    def cache_element_size(self, cache) -> int | None:
        return cache_element_size(cache)

    def weight_stats(self) -> dict:
        return weight_stats(self.module, self.storage)


# quantization libraries transformers imports with modeling_utils whenever they are installed, and the availability
# check it asks first (transformers 5.17 and 5.24: quantizer_torchao, integrations.torchao and cache_utils, at module
# level). A unit's import_s on the 2-core CPU machine: 2.5 s -> 0.8 s without them (bench/unit_overhead.py).
EAGER_IMPORTS = {"torchao": "is_torchao_available", "hqq": "is_hqq_available"}


def own_process(libraries: set[str]) -> None:
    """Before this process imports transformers.modeling_utils: make transformers see the eagerly imported libraries
    the unit does not use as absent, so that it does not import them. For a process of one unit only: a later unit in
    the same process that needs one would find transformers' support for it missing (its module-level imports were
    skipped). Nothing if modeling_utils is already imported."""
    if "transformers.modeling_utils" in sys.modules:
        return
    import transformers.utils as utils
    import transformers.utils.import_utils as import_utils

    for library, check in EAGER_IMPORTS.items():
        if library not in libraries:
            for module in (utils, import_utils):
                if hasattr(module, check):
                    setattr(module, check, _absent)


def _absent(*args, **kwargs) -> bool:
    return False


def load(model: ModelSpec, precision, options, device: str, calibration: dict | None = None) -> HFModel:
    """Load a model at a precision onto `device`. `calibration`: {"text": bytes or None, "name": str} for calibrated
    precisions (gptq, awq)."""
    t0 = time.perf_counter()
    import transformers.modeling_utils  # noqa: F401 - from_pretrained's code (with torchao/hqq unless own_process hid them)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_s = time.perf_counter() - t0  # named here: transformers 5.17 imports it with the auto classes, 5.24 later
    t0 = time.perf_counter()
    where, facts = source_folder(model, device)
    facts.update(prepare_s=time.perf_counter() - t0, import_s=import_s)
    common = {"revision": model.revision} if model.revision else {}
    common["trust_remote_code"] = model.trust_remote_code
    source = where
    loading, method = precision.loading, precision.method
    if loading.prepare is not None:  # calibrated methods load a cached calibrated checkpoint instead
        calibration = calibration or {}
        where, calib = loading.prepare(where, options, device, calibration.get("text"), calibration.get("name"),
                                       model.synthetic)
        facts.update(calib)
    t0 = time.perf_counter()
    plan = loading.build(options, device)
    facts.update(quant_config=plan.description, quant_library=method.library,
                 quant_library_version=library_version(method.distribution or method.library),
                 quant_scheme=method.scheme, weight_bits_nominal=float(precision.bits(options)))
    m = AutoModelForCausalLM.from_pretrained(where, device_map={"": device}, **plan.kwargs, **common)
    m.eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    facts["load_s"] = time.perf_counter() - t0
    if loading.after_load is not None:  # hqq quantizes the loaded model; torchao may unwrap its weights
        t0 = time.perf_counter()
        applied = loading.after_load(m, options, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if applied is not False:
            facts["quantize_s"] = time.perf_counter() - t0
    facts["linear_class"] = linear_class(m)
    t0 = time.perf_counter()
    tokenizer = None if model.synthetic else AutoTokenizer.from_pretrained(source, **common)
    facts["tokenizer_s"] = time.perf_counter() - t0
    return HFModel(m, tokenizer, device, loading.storage, facts)
