"""torchao (0.18) through transformers' TorchAoConfig: int8 weight-only, int8 dynamic activation + int8 weight, int4
weight-only, float8 weight-only.

int4 weight-only takes the packing that works on the device at hand, recorded in `quant_config`: on CUDA
`Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")` (bf16, tinygemm); on CPU, where every packing of
Int4WeightOnlyConfig fails in 0.18, `IntxWeightOnlyConfig(int4, PerGroup)`, which stores each 4-bit value in a byte
(weights_bytes shows it). float8 needs compute capability 8.9 (Ada, Hopper) on a GPU; it runs on CPU.

`unwrap: true` turns each quantized weight into a parametrization over the plain tensors it flattens to
(`torchao.utils.unwrap_tensor_subclass`): the same tokens, and a compiled decode step no longer evaluates a Python
metadata guard and two flattens for every weight on every call, host work (4-5 ms a step for a 7B) that makes
torchao-int4wo's compiled decode host-bound on an H200. Eager, the module rebuilds the subclass at every access
instead.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.precisions.base import (TORCH_DTYPES, DTypeName, Limits, Loading, LoadPlan, Method, Options, Precision,
                                   Served, Stored, added_option, torch_dtype)


class AoOptions(Options):
    compute_dtype: DTypeName = Field("bf16", description="dtype of activations and unquantized modules")
    unwrap: bool = added_option(False, "weights as parametrizations of plain tensors (unwrap_tensor_subclass)")


class AoInt4Options(AoOptions):
    group_size: Literal[32, 64, 128, 256] = 128


def _config(kind: str):
    def build(opts: AoOptions, device: str) -> dict:
        import torch
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                          Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                          Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerTensor)
        from torchao.quantization.granularity import PerGroup
        from transformers import TorchAoConfig

        cuda = device.startswith("cuda")
        if kind == "int8wo":
            cfg, text = Int8WeightOnlyConfig(), "Int8WeightOnlyConfig()"
        elif kind == "int8dq":
            cfg, text = Int8DynamicActivationInt8WeightConfig(), "Int8DynamicActivationInt8WeightConfig()"
        elif kind == "int4wo" and cuda:
            cfg = Int4WeightOnlyConfig(group_size=opts.group_size, int4_packing_format="tile_packed_to_4d")
            text = f"Int4WeightOnlyConfig(group_size={opts.group_size}, int4_packing_format='tile_packed_to_4d')"
        elif kind == "int4wo":
            cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(opts.group_size))
            text = f"IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup({opts.group_size}))"
        elif kind == "fp8w8a8":
            cfg = Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor())
            text = "Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor())"
        else:  # float8: GPUs below compute capability 8.9 are refused by min_capability before loading
            cfg, text = Float8WeightOnlyConfig(), "Float8WeightOnlyConfig()"
        return LoadPlan({"quantization_config": TorchAoConfig(cfg), "dtype": torch_dtype(opts.compute_dtype)},
                        f"torchao {text}" + (" + unwrap_tensor_subclass" if opts.unwrap else ""))

    return build


def _unwrap(model, opts: AoOptions, device: str) -> bool:
    if opts.unwrap:
        from torchao.utils import unwrap_tensor_subclass

        unwrap_tensor_subclass(model)
    return opts.unwrap


def _stored(module):
    """An unwrapped weight: its logical size (the subclass the parametrization rebuilds) and the plain tensors it
    keeps; a wrapped one is counted generically (by what it flattens to)."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module, "weight"):
        return None
    return Stored(module.weight.numel(), list(module.parametrizations.weight.parameters()))


def _int8dq_compile_cuda(opts, batch_size: int) -> str | None:
    if batch_size <= 16:
        return (f"inductor lowers its int8 x int8 matmul to torch._int_mm, which on CUDA needs more than 16 rows; a "
                f"decode step at batch {batch_size} has {batch_size} (RuntimeError on an H200 at batch 1, torch 2.11, "
                f"torchao 0.18)")
    return None


def _bf16(opts) -> bool:
    return opts.compute_dtype == "bf16"


VLLM_TORCHAO = {"vllm": Served(reason="vLLM runs torchao only from a checkpoint saved quantized (or a serialized "
                                      "config); not in flight here")}


def _ao(kind: str, options, bits: int, scheme: str = "weight-only", engines=VLLM_TORCHAO, **limits) -> dict:
    return dict(method=Method("torchao", "torchao", scheme, bits, ("torchao",), extra="torchao"),
                loading=Loading(options, _config(kind), after_load=_unwrap, storage=_stored),
                limits=Limits(needs_bf16=_bf16, **limits), launch_cost=lambda o: 1.5 if scheme == "weight-only" else 2.0,
                engines=engines)


# the same scheme in vLLM: quantization="fp8" quantizes weights per tensor in flight and activations per tensor at
# run time (W8A8 dynamic); not torchao's fp8 weight-only
VLLM_FP8 = {"vllm": Served(lambda o: {"quantization": "fp8", "dtype": TORCH_DTYPES[o.compute_dtype]})}


# stored bytes: torchao's tensor subclasses are counted by the plain tensors they flatten to (tasks.weights)
PRECISIONS = (
    Precision("torchao-int8wo", "torchao int8 weight-only", **_ao("int8wo", AoOptions, 8)),
    Precision("torchao-int8dq", "torchao int8 dynamic activation + int8 weight",
              **_ao("int8dq", AoOptions, 8, "weight+activation", compile_reason_cuda=_int8dq_compile_cuda)),
    Precision("torchao-int4wo", "torchao int4 weight-only (packing per device)", **_ao("int4wo", AoInt4Options, 4)),
    Precision("torchao-fp8wo", "torchao float8 (e4m3) weight-only",
              **_ao("fp8wo", AoOptions, 8, min_capability=lambda o: (8, 9))),
    Precision("fp8-w8a8", "float8 (e4m3) weights and activations, each scaled per tensor, activations at run time "
                          "(W8A8 dynamic): torchao under transformers, quantization=fp8 in vLLM",
              **_ao("fp8w8a8", AoOptions, 8, "weight+activation", engines=VLLM_FP8, devices=("cuda",),
                    min_capability=lambda o: (8, 9))),
)
