"""The transformers engine: a model loaded with AutoModelForCausalLM at a precision (each precision's load plan, from
tasks/precisions), scored window by window, and generated from through the plain steps of tasks/engines/hf_loop.py
(eager, or its decode step compiled)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from common.models import kv_geometry, text_config
from common.units import KvSpec, ModelSpec
from tasks.engines import hf_loop
from tasks.sources import refuse_saved_quantized, source_folder
from tasks.weights import weight_stats


def linear_class(module) -> str:
    """The module classes that run the first decoder layer's projections (which kernel path a method took), e.g.
    "Linear", "Linear4bit", "TorchAtenLinear", "HQQLinear"; a compressed-tensors checkpoint's packed layer (an
    nn.Linear holding weight_packed) reads "Linear(packed)"."""
    layers = next((m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")), module)
    names = {type(m).__name__ + ("(packed)" if hasattr(m, "weight_packed") else "") for n, m in layers.named_modules()
             if n and not [c for name, c in m.named_children() if name != "parametrizations"]  # unwrapped torchao
             and any(hasattr(m, a) for a in ("weight", "qweight", "W_q", "weight_packed"))
             and "norm" not in type(m).__name__.lower()}
    return ",".join(sorted(names))


def library_version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


@dataclass
class HFModel:
    """A loaded transformers model and the verbs the measurements call (tasks.engines.Model)."""
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

    def logits(self, ids):
        return self.module(input_ids=ids, use_cache=False).logits

    def hidden_states(self, ids):
        return self.module.base_model(input_ids=ids, use_cache=False).last_hidden_state

    def output_head(self):
        head = self.module.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def logits_through_cache(self, ids, prefill: int, kv: KvSpec | None):
        return hf_loop.logits_through_cache(self.module, ids, prefill, kv)

    def generation(self, ids, new_tokens: int, decode: str, kv: KvSpec | None) -> hf_loop.HFGeneration:
        return hf_loop.HFGeneration(self.module, ids, new_tokens, decode, kv, self.device)

    def weight_stats(self) -> dict:
        return weight_stats(self.module, self.storage)


# quantization libraries transformers imports with modeling_utils whenever they are installed, and the availability
# check it asks first (transformers 5.17 and 5.24: quantizer_torchao, integrations.torchao and cache_utils, at module
# level). A unit's import_s on a 2-core CPU machine: 2.5 s -> 0.8 s without them (benchmarks/unit_overhead.py).
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


def device_map(device: str, unit=None):
    """Every weight on `device`, or, for a unit holding several GPUs (Ray made them its only visible ones), layers
    split across all of them."""
    if device.startswith("cuda") and unit is not None and unit.gpus > 1 and torch.cuda.device_count() > 1:
        return "auto"
    return {"": device}


def load(model: ModelSpec, precision, options, device: str, calibration: dict | None = None, unit=None) -> HFModel:
    """Load a model at a precision onto `device`. `calibration`: {"text": bytes or None, "name": str} for calibrated
    precisions (gptq, awq). Every cell of a unit runs on the one loaded model; a unit that holds several GPUs has its
    layers split across them in order (accelerate's device_map "auto"; inputs and the first layers on `device`)."""
    t0 = time.perf_counter()
    import transformers.modeling_utils  # noqa: F401 - from_pretrained's code (with torchao/hqq unless own_process hid them)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import_s = time.perf_counter() - t0  # named here: transformers 5.17 imports it with the auto classes, 5.24 later
    t0 = time.perf_counter()
    where, facts = source_folder(model, device)
    facts.update(prepare_s=time.perf_counter() - t0, import_s=import_s)
    common = {"revision": model.revision} if model.revision else {}
    common["trust_remote_code"] = model.trust_remote_code
    source = where
    refuse_saved_quantized(AutoConfig.from_pretrained(source, **common), source)
    loading, method = precision.loading, precision.method
    if loading.folder is not None:  # a checkpoint saved quantized, loaded as saved
        where = loading.folder(options)
    elif loading.prepare is not None:  # calibrated methods load a cached calibrated checkpoint instead
        calibration = calibration or {}
        where, calib = loading.prepare(where, options, device, calibration.get("text"), calibration.get("name"),
                                       model.synthetic)
        facts.update(calib)
    t0 = time.perf_counter()
    plan = loading.build(options, device)
    facts.update(quant_config=plan.description, quant_library=method.library,
                 quant_library_version=library_version(method.distribution or method.library),
                 quant_scheme=method.scheme, weight_bits_nominal=float(precision.bits(options)))
    m = AutoModelForCausalLM.from_pretrained(where, device_map=device_map(device, unit), **plan.kwargs, **common)
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
