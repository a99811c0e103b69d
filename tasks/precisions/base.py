"""What a backend is: a `Precision` declares what it is (library, scheme, bits), how it loads (its options, the load
plan it builds, a step after loading or before it, how its stored tensors are counted) and where it cannot run
(devices, compute capability, bf16, compiled decode, projection shapes). The shared code reads these declarations;
it never names a library. Importing a backend imports neither torch nor its library."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.catalog import kv_dtype_reason, not_installed

DTypeName = Literal["fp32", "fp16", "bf16"]
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class Options(BaseModel):
    """A precision's options as a grid gives them: unknown keys refused, no coercion (true is not 1, "8" is not 8),
    no .inf or .nan."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    def key(self) -> dict:
        """The options as they identify a cell: every option, less those added after cells were measured
        (`added_option`) while they keep their default, so that those cells' rows still answer for them."""
        fields = type(self).model_fields
        return {k: v for k, v in self.model_dump().items()
                if not ((fields[k].json_schema_extra or {}).get("key_when_set") and v == fields[k].default)}


def added_option(default: Any, description: str) -> Any:
    """A field for an option added to a backend that already has measured cells: at its default it leaves the
    cell key as it was (Options.key), so a grid that does not set it reuses the rows measured before it existed."""
    return Field(default, description=description, json_schema_extra={"key_when_set": True})


class NoOptions(Options):
    pass


@dataclass(frozen=True)
class LoadPlan:
    """How a precision loads: the arguments for the engine's loader (for transformers: from_pretrained's dtype and
    quantization_config) and a one-line description of what was applied, recorded on rows as `quant_config`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str | None = None


@dataclass(frozen=True)
class Stored:
    """A module whose weight a backend stores its own way: the logical parameter count (a packed 4-bit tensor
    counted unpacked) and every tensor that holds its state (packed values, scales, zero points, code books)."""
    params: int
    tensors: Iterable[Any]


@dataclass(frozen=True)
class Method:
    """What the precision is."""
    library: str = "torch"                        # who quantizes: torch (none), bitsandbytes, torchao, quanto, ...
    distribution: str | None = None               # its pip distribution, for the version column (None: = library)
    scheme: str = "none"                          # none | weight-only | weight+activation
    weight_bits: float | Callable[[Options], float] = 16.0  # nominal bits of a stored weight
    # modules its loading imports: never preloaded by the fork server (quantization libraries may initialise CUDA at
    # import, and a forked child could then not use the GPU)
    imports: tuple[str, ...] = ()
    # whether its numbers are the same whichever windows share a forward pass (LLM.int8 with outliers is not: it
    # picks outlier columns per batch)
    batch_invariant: Callable[[Options], bool] = field(default=lambda o: True)
    extra: str | None = None                      # the project's pip extra that installs its library

    def missing(self) -> str | None:
        """Why its library cannot be loaded here (not installed: found from installed distributions' metadata,
        nothing imported), naming what installs it; None where it is installed or part of the core, or where the
        library is a saved checkpoint's format's (known from its config; the engine says what it lacks)."""
        if not self.distribution and self.library in ("torch", "checkpoint"):
            return None
        name = self.distribution or self.library
        how = not_installed(name, self.extra)
        if how is None:
            return None
        more = " and pip install --no-deps gptqmodel==7.6.0 (scripts/setup.sh --test does both)" \
            if self.extra == "gptq" else ""
        return f"{name} is not installed: {how}{more}"


@dataclass(frozen=True)
class Loading:
    """How it loads."""
    options: type[Options] = NoOptions
    build: Callable[[Options, str], LoadPlan] = field(default=lambda o, device: LoadPlan())  # (options, device)
    # a step on the loaded model (hqq quantizes it through its own API, torchao may unwrap its weights): (model,
    # options, device) -> False where the options ask for nothing (no quantize_s then)
    after_load: Callable[[Any, Options, str], bool | None] | None = None
    # calibrated methods (gptq, awq): (source folder, options, device, calibration text or None, its name,
    # synthetic?) -> (folder of the calibrated checkpoint to load instead, calibration facts for the row)
    prepare: Callable[..., tuple[str, dict[str, Any]]] | None = None
    # a checkpoint saved quantized: (options) -> the folder to load in place of the model's (its tokenizer stays)
    folder: Callable[[Options], str] | None = None
    # modules whose weights the backend stores its own way (tasks.weights counts the rest generically)
    storage: Callable[[Any], Stored | None] | None = None


def _said(reason, *args) -> str | None:
    """A reason given as text, or as a function of the options (and batch size) that returns one."""
    return reason(*args) if callable(reason) else reason


@dataclass(frozen=True)
class Limits:
    """Where it cannot run: each answer is a reason, known before the sweep starts where the grid tells."""
    devices: tuple[str, ...] = ("cuda", "cpu")    # device types it runs on
    needs_bf16: Callable[[Options], bool] = field(default=lambda o: False)
    min_capability: Callable[[Options], tuple[int, int] | None] = field(default=lambda o: None)  # on CUDA
    # why decode: compiled cannot run with it anywhere (None: it can): text, or (options) -> text
    compile_reason: str | Callable[[Options], str | None] | None = None
    # why compiled decode cannot run on GPUs (CUDA graphs), where CPU compiles: text, or (options, batch size) -> text
    compile_reason_cuda: str | Callable[[Options, int], str | None] | None = None
    # projection shapes its groups or kernels cannot take: (options, widths, GPU compute capability or None) -> why
    shape_reason: Callable[[Options, dict[str, int], tuple[int, int] | None], str | None] | None = None
    # models it cannot stand for: (options, synthetic?, the model's config or None) -> why
    model_reason: Callable[[Options, bool, dict | None], str | None] | None = None


@dataclass(frozen=True)
class Served:
    """How an engine other than transformers runs the precision: its load arguments from the options (for vLLM:
    `LLM(...)` keyword arguments), or why it cannot (said before the sweep starts)."""
    args: Callable[[Options], dict[str, Any]] | None = None
    reason: str | Callable[[Options], str | None] | None = None
    # a calibrated precision: the quantization_config its checkpoint carries, from which the engine builds a model
    # with random packed weights where the model's weights are random anyway (synthetic: calibration buys nothing)
    checkpoint: Callable[[Options], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Precision:
    name: str
    description: str
    method: Method = Method()
    loading: Loading = Loading()
    limits: Limits = Limits()
    # decode cost per layer relative to fp16 when launches dominate (only orders units, largest first); measured on
    # an H200 with SmolLM2-135M: nf4 1.9x, fp4 1.4x, int8 (threshold 0) 2.4x, int8 (threshold 6) 3.9x
    launch_cost: Callable[[Options], float] = field(default=lambda o: 1.0)
    # engines other than transformers (hf, every precision's own) that run it, by engine name
    engines: dict[str, Served] = field(default_factory=dict)

    def engine_reason(self, engine: str, opts: Options) -> str | None:
        """Why `engine` cannot run this precision with these options, or None."""
        if engine == "hf":
            return None
        served = self.engines.get(engine)
        if served is None:
            return f"{self.name} has no {engine} path"
        reason = _said(served.reason, opts)
        return f"{self.name} on {engine}: {reason}" if reason else None

    def kv_reason(self, engine: str, kv_name: str, opts: Options, capability: tuple[int, int] | None) -> str | None:
        """Why `engine` cannot hold this KV cache beside this precision's activations on a GPU of this compute
        capability (None: not known), or None."""
        if engine not in self.engines:
            return None
        return kv_dtype_reason(kv_name, engine, self.engine_args(engine, opts).get("dtype"), capability)

    def random_packed(self, engine: str, synthetic: bool) -> bool:
        """A synthetic model of this calibrated precision on `engine` loads as random packed weights in the
        checkpoint's format (Served.checkpoint): no calibration, none of the method's library."""
        served = self.engines.get(engine)
        return synthetic and served is not None and served.checkpoint is not None

    def engine_args(self, engine: str, opts: Options) -> dict[str, Any]:
        served = self.engines[engine]
        return served.args(opts) if served.args else {}

    def parse_options(self, raw: dict[str, Any]) -> Options:
        return self.loading.options(**raw)

    @property
    def calibrated(self) -> bool:
        return self.loading.prepare is not None

    def bits(self, opts: Options) -> float:
        b = self.method.weight_bits
        return b(opts) if callable(b) else b

    def decode_reason(self, decode: str, device_type: str | None = None, opts: Options | None = None,
                      batch_size: int = 1) -> str | None:
        """Why a cell with this decode path (and batch size) cannot run with this backend (on this device type, if
        known), or None."""
        if decode != "compiled":
            return None
        opts = opts if opts is not None else self.loading.options()
        anywhere = _said(self.limits.compile_reason, opts)
        if anywhere:
            return f"decode: compiled is not available for {self.name}: {anywhere}"
        cuda = _said(self.limits.compile_reason_cuda, opts, batch_size) if device_type == "cuda" else None
        return f"decode: compiled (CUDA graphs) is not available for {self.name} on GPUs: {cuda}" if cuda else None

    def unsupported_reason(self, device_type: str, opts: Options, bf16_ok: bool | None = True,
                           capability: tuple[int, int] | None = None) -> str | None:
        """Why this precision cannot run on the device at hand, or None. `capability`: the GPU's compute capability
        when known (before the sweep, from the cluster's accelerator type; in the worker, from the device)."""
        limits = self.limits
        if device_type not in limits.devices:
            return f"{self.name} does not run on {device_type} (runs on {', '.join(limits.devices)})"
        if limits.needs_bf16(opts) and (bf16_ok is False or (device_type == "cuda" and capability is not None
                                                             and capability < (8, 0))):
            return f"{self.name} with bf16 needs a GPU with bfloat16 support (compute capability 8.0 or newer)"
        need = limits.min_capability(opts) if device_type == "cuda" else None
        if need and capability is not None and capability < need:
            return (f"{self.name} needs compute capability {need[0]}.{need[1]} or newer; the GPU has "
                    f"{capability[0]}.{capability[1]}")
        return None

    def model_reason(self, opts: Options, synthetic: bool, model_config: dict | None) -> str | None:
        return self.limits.model_reason(opts, synthetic, model_config) if self.limits.model_reason else None

    def shape_reason(self, opts: Options, widths: dict[str, int], capability) -> str | None:
        return self.limits.shape_reason(opts, widths, capability) if self.limits.shape_reason else None


def torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPES[name])
