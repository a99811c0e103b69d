from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict

DTypeName = Literal["fp32", "fp16", "bf16"]
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Precision:
    name: str
    description: str
    devices: tuple[str, ...]                      # device types it runs on: "cuda", "cpu"
    options: type[BaseModel] = NoOptions
    # options -> kwargs for AutoModelForCausalLM.from_pretrained (quantization_config, dtype)
    build: Callable[[BaseModel], dict[str, Any]] = field(default=lambda o: {})
    needs_bf16: Callable[[BaseModel], bool] = field(default=lambda o: False)
    weight_bits: float = 16.0                     # nominal bits of a stored weight
    # decode cost per layer relative to fp16 when launches dominate (only orders units, largest first); measured on
    # an H200 with SmolLM2-135M: nf4 1.9x, fp4 1.4x, int8 (threshold 0) 2.4x, int8 (threshold 6) 3.9x
    launch_cost: Callable[[BaseModel], float] = field(default=lambda o: 1.0)

    def parse_options(self, raw: dict[str, Any]) -> BaseModel:
        return self.options(**raw)

    def unsupported_reason(self, device_type: str, opts: BaseModel, bf16_ok: bool) -> str | None:
        """Why this precision cannot run on the device at hand, or None."""
        if device_type not in self.devices:
            return f"{self.name} does not run on {device_type} (runs on {', '.join(self.devices)})"
        if self.needs_bf16(opts) and not bf16_ok:
            return f"{self.name} with bf16 needs a GPU with bfloat16 support (compute capability 8.0 or newer)"
        return None


def torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPES[name])
