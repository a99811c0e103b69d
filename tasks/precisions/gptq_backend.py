"""GPTQ and AWQ (calibrated, weight-only) through gptqmodel 7.6: calibrated once into a cached checkpoint
(tasks.calibration), then loaded through transformers (GPTQConfig / AwqConfig in the checkpoint) like any other
precision. Calibration text: the WikiText-2 *validation* split by default (the driver refuses the test split);
calibration time is the `calibration_s` column."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from tasks.precisions.base import Options, Precision


class Calibrated(Options):
    calib_path: str | None = Field(None, description="calibration text file; null: $WIKITEXT2_VALID_PATH, else the "
                                                     "hub's wikitext-2-raw-v1 validation split")
    calib_samples: PositiveInt = 128
    calib_seqlen: PositiveInt = 512
    kernel: str = Field("auto", description="gptqmodel kernel to load with (transformers' `backend`): auto, torch, "
                                            "triton, marlin, exllama_v2, ...")


class GptqOptions(Calibrated):
    bits: Literal[8, 4, 3, 2] = 4
    group_size: Literal[-1, 32, 64, 128] = 128
    act_order: bool = False
    sym: bool = True


class AwqOptions(Calibrated):
    bits: Literal[4] = 4
    group_size: Literal[32, 64, 128] = 128


def _method(name: str):
    def build(opts, device: str) -> dict:
        import torch
        from tasks.calibration import quant_config_text

        kwargs = {"dtype": torch.float16, "_quant_config": quant_config_text(name, opts)}
        if opts.kernel != "auto":
            from transformers import AwqConfig, GPTQConfig

            cls = AwqConfig if name == "awq" else GPTQConfig
            kwargs["quantization_config"] = cls(bits=opts.bits, group_size=opts.group_size, backend=opts.kernel)
        return kwargs

    def prepare(source: str, opts, device: str, text: bytes | None, text_name: str | None, synthetic: bool):
        from tasks.calibration import quantized_folder

        return quantized_folder(source, name, opts, device, text, text_name, synthetic)

    def shape_reason(opts, widths: dict, capability) -> str | None:
        from tasks.calibration import shape_problem

        return shape_problem(name, opts, widths, capability)

    return {"build": build, "prepare": prepare, "shape_reason": shape_reason}


def _marlin_compile_cuda(method: str, kernels: tuple[str, ...]):
    """Marlin layers (GPTQ and AWQ) look up their scratch space through a ContextVar, which dynamo cannot trace: seen
    on an H200 for AWQ with kernel auto (which loads AwqMarlinLinear there) and for GPTQ with kernel marlin."""
    def reason(opts, batch_size: int) -> str | None:
        if opts.kernel in kernels:
            layer = "AwqMarlinLinear" if method == "awq" else "MarlinLinear"
            return (f"kernel {opts.kernel} loads {method.upper()} with gptqmodel's {layer}, whose scratch-space "
                    f"lookup (ContextVar.get) torch.compile cannot trace (torch 2.11, gptqmodel 7.6, on an H200)")
        return None

    return reason


C = {"library": "gptqmodel", "scheme": "weight-only", "weight_bits": lambda o: o.bits,
     "launch_cost": lambda o: 2.0}
PRECISIONS = (
    Precision("gptq", "GPTQ (calibrated, second-order weight rounding), gptqmodel 7.6", ("cuda", "cpu"), GptqOptions,
              **_method("gptq"), compile_reason_cuda=_marlin_compile_cuda("gptq", ("marlin",)), **C),
    Precision("awq", "AWQ (calibrated, activation-aware scaling), gptqmodel 7.6, GEMM format", ("cuda", "cpu"),
              AwqOptions, **_method("awq"), compile_reason_cuda=_marlin_compile_cuda("awq", ("auto", "marlin")),
              **C),
)
