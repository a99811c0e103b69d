"""optimum-quanto (0.2.7) through transformers' QuantoConfig: int8, int4 and int2 weights (activations stay in the
compute dtype: transformers refuses quanto's activation quantization). The first int4/int2 use compiles quanto's
C++ (CPU) or CUDA extension, 20-50 s, once per environment; it is in the load time of that unit."""
from __future__ import annotations

from pydantic import Field

from tasks.precisions.base import DTypeName, Options, Precision, torch_dtype


class QuantoOptions(Options):
    compute_dtype: DTypeName = Field("bf16", description="dtype of activations and unquantized modules")


def _weights(kind: str):
    def build(opts: QuantoOptions, device: str) -> dict:
        from transformers import QuantoConfig

        return {"quantization_config": QuantoConfig(weights=kind), "dtype": torch_dtype(opts.compute_dtype),
                "_quant_config": f"optimum-quanto QuantoConfig(weights='{kind}')"}

    return build


Q = {"library": "quanto", "scheme": "weight-only", "needs_bf16": lambda o: o.compute_dtype == "bf16"}
PRECISIONS = (
    Precision("quanto-int8", "optimum-quanto int8 weights", ("cuda", "cpu"), QuantoOptions, _weights("int8"),
              weight_bits=8, launch_cost=lambda o: 2.0, **Q),
    Precision("quanto-int4", "optimum-quanto int4 weights (group-wise)", ("cuda", "cpu"), QuantoOptions,
              _weights("int4"), weight_bits=4, launch_cost=lambda o: 2.0,
              compile_reason_cuda="its compiled decode failed on an H200 (torch 2.11, quanto 0.2.7): under fake "
                                  "tensors its int4 CUDA matmul gives float32 queries against bfloat16 keys in "
                                  "scaled_dot_product_attention", **Q),
    Precision("quanto-int2", "optimum-quanto int2 weights (group-wise)", ("cuda", "cpu"), QuantoOptions,
              _weights("int2"), weight_bits=2, launch_cost=lambda o: 2.0, **Q),
)
