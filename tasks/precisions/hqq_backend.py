"""HQQ (0.2.8) through its own API: transformers' HqqConfig is broken in 5.x ("QuantizationMethod.HQQ is not available
yet"), so the model is loaded in the compute dtype and its Linear layers are replaced in place by HQQLinear
(`AutoHQQHFModel.quantize_model`). Calibration-free; the quantization time is recorded as `quantize_s`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.precisions.base import DTypeName, Options, Precision, torch_dtype


class HqqOptions(Options):
    bits: Literal[8, 4, 3, 2, 1] = 4
    group_size: Literal[32, 64, 128, 256] = 64
    compute_dtype: DTypeName = Field("fp16", description="dtype the weights are dequantized to for each matmul")


def _load_kwargs(opts: HqqOptions, device: str) -> dict:
    return {"dtype": torch_dtype(opts.compute_dtype),
            "_quant_config": f"hqq BaseQuantizeConfig(nbits={opts.bits}, group_size={opts.group_size}), "
                             f"AutoHQQHFModel.quantize_model"}


def _quantize(model, opts: HqqOptions, device: str) -> None:
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=opts.bits, group_size=opts.group_size),
                                  compute_dtype=torch_dtype(opts.compute_dtype), device=device)


PRECISIONS = (
    Precision("hqq", "HQQ half-quadratic weight quantization (no calibration)", ("cuda", "cpu"), HqqOptions,
              _load_kwargs, after_load=_quantize, needs_bf16=lambda o: o.compute_dtype == "bf16",
              weight_bits=lambda o: o.bits, library="hqq", scheme="weight-only", launch_cost=lambda o: 2.0),
)
