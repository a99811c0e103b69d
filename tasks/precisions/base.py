from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict

DTypeName = Literal["fp32", "fp16", "bf16"]
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class Options(BaseModel):
    """A precision's options as a grid gives them: unknown keys refused, no coercion (true is not 1, "8" is not 8),
    no .inf or .nan."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class NoOptions(Options):
    pass


@dataclass(frozen=True)
class Precision:
    name: str
    description: str
    devices: tuple[str, ...]                      # device types it runs on: "cuda", "cpu"
    options: type[BaseModel] = NoOptions
    # (options, device) -> kwargs for AutoModelForCausalLM.from_pretrained (quantization_config, dtype); a
    # "_quant_config" entry, if any, is a one-line description of what was applied (recorded as `quant_config`)
    build: Callable[[BaseModel, str], dict[str, Any]] = field(default=lambda o, device: {})
    # for libraries that quantize a loaded model in place through their own API (hqq): (model, options, device)
    after_load: Callable[[Any, BaseModel, str], str | None] | None = None
    # for calibrated methods (gptq, awq): (source folder, options, device, calibration text or None, its name,
    # synthetic?) -> (folder of the calibrated checkpoint to load instead, calibration facts for the row)
    prepare: Callable[..., tuple[str, dict[str, Any]]] | None = None
    needs_bf16: Callable[[BaseModel], bool] = field(default=lambda o: False)
    weight_bits: float | Callable[[BaseModel], float] = 16.0  # nominal bits of a stored weight
    compile_reason: str | None = None             # why decode: compiled cannot run with this backend (None: it can)
    # why compiled decode cannot run on GPUs (CUDA graphs), where CPU compiles: text, or (options, batch size) -> text
    # or None
    compile_reason_cuda: str | Callable[[BaseModel, int], str | None] | None = None
    # projection shapes a method's groups or kernels cannot take: (options, widths, GPU compute capability or None)
    # -> why, or None; widths: hidden_size, intermediate_size, kv projection width (see tasks.calibration)
    shape_reason: Callable[[BaseModel, dict[str, int], tuple[int, int] | None], str | None] | None = None
    min_capability: Callable[[BaseModel], tuple[int, int] | None] = field(default=lambda o: None)  # on CUDA
    library: str = "torch"                        # who quantizes: torch (none), bitsandbytes, torchao, quanto, hqq
    scheme: str = "none"                          # none | weight-only | weight+activation
    # decode cost per layer relative to fp16 when launches dominate (only orders units, largest first); measured on
    # an H200 with SmolLM2-135M: nf4 1.9x, fp4 1.4x, int8 (threshold 0) 2.4x, int8 (threshold 6) 3.9x
    launch_cost: Callable[[BaseModel], float] = field(default=lambda o: 1.0)

    def parse_options(self, raw: dict[str, Any]) -> BaseModel:
        return self.options(**raw)

    def decode_reason(self, decode: str, device_type: str | None = None, opts: BaseModel | None = None,
                      batch_size: int = 1) -> str | None:
        """Why a cell with this decode path (and batch size) cannot run with this backend (on this device type, if
        known), or None."""
        if decode != "compiled":
            return None
        if self.compile_reason:
            return f"decode: compiled is not available for {self.name}: {self.compile_reason}"
        cuda = self.compile_reason_cuda if device_type == "cuda" else None
        if callable(cuda):
            cuda = cuda(opts if opts is not None else self.options(), batch_size)
        return f"decode: compiled (CUDA graphs) is not available for {self.name} on GPUs: {cuda}" if cuda else None

    @property
    def calibrated(self) -> bool:
        return self.prepare is not None

    def bits(self, opts: BaseModel) -> float:
        return self.weight_bits(opts) if callable(self.weight_bits) else self.weight_bits

    def unsupported_reason(self, device_type: str, opts: BaseModel, bf16_ok: bool | None = True,
                           capability: tuple[int, int] | None = None) -> str | None:
        """Why this precision cannot run on the device at hand, or None. `capability`: the GPU's compute capability
        when known (before the sweep, from the cluster's accelerator type; in the worker, from the device)."""
        if device_type not in self.devices:
            return f"{self.name} does not run on {device_type} (runs on {', '.join(self.devices)})"
        if self.needs_bf16(opts) and (bf16_ok is False or (device_type == "cuda" and capability is not None
                                                           and capability < (8, 0))):
            return f"{self.name} with bf16 needs a GPU with bfloat16 support (compute capability 8.0 or newer)"
        need = self.min_capability(opts) if device_type == "cuda" else None
        if need and capability is not None and capability < need:
            return (f"{self.name} needs compute capability {need[0]}.{need[1]} or newer; the GPU has "
                    f"{capability[0]}.{capability[1]}")
        return None


def torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPES[name])
