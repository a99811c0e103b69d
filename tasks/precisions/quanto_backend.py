"""optimum-quanto (0.2.7) through transformers' QuantoConfig: int8, int4 and int2 weights (activations stay in the
compute dtype: transformers refuses quanto's activation quantization). The first int4/int2 use compiles quanto's
C++ (CPU) or CUDA extension, 20-50 s, once per environment; it is in the load time of that unit."""
from __future__ import annotations

from pydantic import Field

from tasks.precisions.base import DTypeName, Limits, Loading, LoadPlan, Method, Options, Precision, torch_dtype


class QuantoOptions(Options):
    compute_dtype: DTypeName = Field("bf16", description="dtype of activations and unquantized modules")


def _weights(kind: str):
    def build(opts: QuantoOptions, device: str) -> dict:
        from transformers import QuantoConfig

        return LoadPlan({"quantization_config": QuantoConfig(weights=kind), "dtype": torch_dtype(opts.compute_dtype)},
                        f"optimum-quanto QuantoConfig(weights='{kind}')")

    return build


def _quanto(kind: str, bits: int, **limits) -> dict:
    return dict(method=Method("quanto", "optimum-quanto", "weight-only", bits, ("optimum.quanto",), extra="quanto"),
                loading=Loading(QuantoOptions, _weights(kind)),
                limits=Limits(needs_bf16=lambda o: o.compute_dtype == "bf16", **limits), launch_cost=lambda o: 2.0)


# stored bytes: quanto's packed tensor subclasses are counted by the plain tensors they flatten to (tasks.weights)
PRECISIONS = (
    Precision("quanto-int8", "optimum-quanto int8 weights", **_quanto("int8", 8)),
    Precision("quanto-int4", "optimum-quanto int4 weights (group-wise)", **_quanto(
        "int4", 4, compile_reason_cuda="its compiled decode failed on an H200 (torch 2.11, quanto 0.2.7): under fake "
                                      "tensors its int4 CUDA matmul gives float32 queries against bfloat16 keys in "
                                      "scaled_dot_product_attention")),
    Precision("quanto-int2", "optimum-quanto int2 weights (group-wise)", **_quanto("int2", 2)),
)
