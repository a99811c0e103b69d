"""Unquantized weights: fp32, fp16, bf16."""
from __future__ import annotations

from tasks.precisions.base import Precision, torch_dtype


def _dtype(name: str):
    return lambda opts, device: {"dtype": torch_dtype(name)}


PRECISIONS = (
    Precision("fp32", "float32 weights and compute", ("cuda", "cpu"), build=_dtype("fp32"), weight_bits=32),
    Precision("fp16", "float16 weights and compute", ("cuda", "cpu"), build=_dtype("fp16"), weight_bits=16),
    Precision("bf16", "bfloat16 weights and compute", ("cuda", "cpu"), build=_dtype("bf16"),
              needs_bf16=lambda o: True, weight_bits=16),
)
