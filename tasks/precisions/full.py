"""Unquantized weights: fp32, fp16, bf16."""
from __future__ import annotations

from tasks.precisions.base import TORCH_DTYPES, Limits, Loading, LoadPlan, Method, Precision, Served, torch_dtype


def _dtype(name: str):
    return Loading(build=lambda opts, device: LoadPlan({"dtype": torch_dtype(name)}))


def _vllm(name: str) -> dict:
    return {"vllm": Served(lambda o: {"dtype": TORCH_DTYPES[name]})}


PRECISIONS = (
    Precision("fp32", "float32 weights and compute", Method(weight_bits=32), _dtype("fp32"), engines=_vllm("fp32")),
    Precision("fp16", "float16 weights and compute", Method(weight_bits=16), _dtype("fp16"), engines=_vllm("fp16")),
    Precision("bf16", "bfloat16 weights and compute", Method(weight_bits=16), _dtype("bf16"),
              Limits(needs_bf16=lambda o: True), engines=_vllm("bf16")),
)
