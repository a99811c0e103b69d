"""HQQ (0.2.8) through its own API: transformers' HqqConfig is broken in 5.x ("QuantizationMethod.HQQ is not available
yet"), so the model is loaded in the compute dtype and its Linear layers are replaced in place by HQQLinear
(`AutoHQQHFModel.quantize_model`). Calibration-free; the quantization time is recorded as `quantize_s`."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from tasks.precisions.base import (DTypeName, Limits, Loading, LoadPlan, Method, Options, Precision, Stored,
                                  torch_dtype)


class HqqOptions(Options):
    bits: Literal[8, 4, 3, 2, 1] = 4
    group_size: Literal[32, 64, 128, 256] = 64
    compute_dtype: DTypeName = Field("fp16", description="dtype the weights are dequantized to for each matmul")


def _load_plan(opts: HqqOptions, device: str) -> LoadPlan:
    return LoadPlan({"dtype": torch_dtype(opts.compute_dtype)},
                    f"hqq BaseQuantizeConfig(nbits={opts.bits}, group_size={opts.group_size}), "
                    f"AutoHQQHFModel.quantize_model")


def _quantize(model, opts: HqqOptions, device: str) -> None:
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=opts.bits, group_size=opts.group_size),
                                  compute_dtype=torch_dtype(opts.compute_dtype), device=device)


def meta_tensors(meta: dict):
    """The tensors in an HQQ `meta` (scale, zero, and the meta of quantized scales/zeros, recursively)."""
    for v in meta.values():
        if hasattr(v, "data_ptr"):
            yield v
        elif isinstance(v, dict):
            yield from meta_tensors(v)


def stored(module) -> Stored | None:
    """HQQLinear: W_q (packed) counted by the shape in its meta, plus the scale and zero tensors there."""
    meta = getattr(module, "meta", None)
    if getattr(module, "W_q", None) is None or not isinstance(meta, dict):
        return None
    return Stored(math.prod(meta["shape"]), [module.W_q, *meta_tensors(meta)])  # (a bias counts as any parameter)


PRECISIONS = (
    Precision("hqq", "HQQ half-quadratic weight quantization (no calibration)",
              Method("hqq", "hqq", "weight-only", lambda o: o.bits, ("hqq",), extra="hqq"),
              Loading(HqqOptions, _load_plan, after_load=_quantize, storage=stored),
              Limits(needs_bf16=lambda o: o.compute_dtype == "bf16"), launch_cost=lambda o: 2.0),
)
