"""What the driver hands a worker: a unit (one model at one precision, with its cells and settings) as typed plain
data. It crosses Ray and the fork server's pipe by pickle; nothing in it needs torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# engines a grid may name (tasks/engines/<name>.py): transformers (eager, or its decode step compiled), vLLM
ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class ModelSpec:
    """A model entry: one source (hub id, local folder, GGUF file or `pkg:` path, synthetic name or shapes), its label,
    local paths already absolute."""
    source: str                      # hub | path | gguf | synthetic
    location: Any                    # the hub id, folder, file, or synthetic name / shapes mapping
    label: str
    revision: str | None = None
    trust_remote_code: bool = False
    fingerprint: str | None = None   # the weights' identity (orchestrator.model_info.identify): part of the keys

    @property
    def synthetic(self) -> bool:
        return self.source == "synthetic"

    def identity(self) -> dict:
        """What makes it this model (the label does not): hashed into keys, written to rows as `model_spec`."""
        d: dict = {self.source: self.location}
        if self.revision:
            d["revision"] = self.revision
        if self.trust_remote_code:
            d["trust_remote_code"] = True
        if self.fingerprint:
            d["fingerprint"] = self.fingerprint
        return d


@dataclass(frozen=True)
class KvSpec:
    name: str = "native"
    options: dict = field(default_factory=dict)
    label: str = "native"


NATIVE_KV = KvSpec()


@dataclass(frozen=True)
class CellSpec:
    """One point of the grid within its unit."""
    key: str
    new_tokens: int
    batch_size: int
    decode: str = "eager"            # eager | compiled
    kv: KvSpec = NATIVE_KV
    prompt_tokens: int = 32


@dataclass(frozen=True)
class Calibration:
    """Calibration data of a calibrated precision (gptq, awq): a file's bytes (shipped with the unit), the hub's
    validation split (text None, fetched by the worker), or random ids for a model without a tokenizer."""
    name: str
    sha256: str | None = None
    text: bytes | None = None


@dataclass(frozen=True)
class PrecisionSpec:
    name: str
    options: dict                    # every option, defaults included
    label: str                       # name plus the options that differ from the defaults
    calibration: Calibration | None = None
    description: str | None = None   # what it quantizes and how, in words (the registry's)


@dataclass(frozen=True)
class GenerationSpec:
    warmup: int
    repeats: int                     # timed runs; 0: auto (until the decode interval is narrow enough)
    profile: bool = False
    max_repeats: int = 30            # auto: at most this many timed runs,
    max_seconds: float = 60.0        # and this much timed work,
    target_halfwidth: float = 0.02   # stopping once the 95% interval's half-width / mean is this small
    throughput: tuple[int, int, int] | None = None  # offline throughput: (requests, prompt_tokens, new_tokens)


@dataclass(frozen=True)
class PerplexitySpec:
    protocol: str
    seqlen: int
    stride: int
    max_windows: int | None
    batch_size: int
    dataset: str | None = None       # a file path or hub:wikitext/...
    sha256: str | None = None
    through_kv: bool = False         # kv-continuation perplexity per KV cache (the grid has a quantized one)
    kv_windows: int = 4
    kv_prefill: int = 1024
    kv_continuation: int = 512


@dataclass
class ReferenceSpec:
    """The baseline's reference for distances (tasks.distance): the baseline unit makes it (role "make"); the
    model's other units use it (role "use"), from the node's cache (common.cache.reference_path) or, where that has
    none, from Ray's object store (`holder`: [ObjectRef of the file's bytes], nested so Ray does not fetch it before
    it is needed). `missing`: why there is none (the baseline unit failed, ...), recorded on the rows."""
    key: str
    role: str                        # make | use
    baseline: str                    # the baseline precision's label
    holder: list | None = None
    missing: str | None = None


@dataclass
class UnitSpec:
    sweep: str
    run_id: str
    unit_id: str
    model: ModelSpec
    precision: PrecisionSpec
    cells: list[CellSpec]
    generation: GenerationSpec
    perplexity: PerplexitySpec | None
    gpus: float
    cpus: float | None = None
    baseline: str | None = None
    attempt: int = 1
    engine: str = "hf"
    reference: ReferenceSpec | None = None
    # quality columns already measured for this (model, precision, perplexity settings, baseline) in the output folder:
    # reused instead of measured again (perplexity, its windows and interval, the distance to the baseline)
    known_quality: dict | None = None
    reference_only: bool = False     # no cells: load the baseline only to make its reference (or find it cached)
    quality_key: str | None = None
    usd_per_gpu_hour: float | None = None   # the grid's cost: dollars per million generated tokens on the rows
