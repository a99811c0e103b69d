"""bitsandbytes: LLM.int8 and the 4-bit formats (nf4, fp4, nf4 with double quantization).

bitsandbytes 0.50 runs all of them on CUDA and on CPU. Every option that changes a number is an option here and is
recorded on each row: the int8 outlier threshold (transformers' default 6.0; optimum-benchmark uses 0.0, which decodes
several times faster), the 4-bit compute dtype and double quantization. Stored bytes: the packed weight plus its
quant_state (absmax, nested scales, code books) for 4-bit, the int8 weight plus its row scales (SCB) for LLM.int8.
"""
from __future__ import annotations

import math

from pydantic import Field

from tasks.precisions.base import (TORCH_DTYPES, DTypeName, Limits, Loading, LoadPlan, Method, Options, Precision,
                                   Served, Stored, torch_dtype)


class Int8Options(Options):
    threshold: float = Field(6.0, ge=0, description="LLM.int8 outlier threshold; 0 disables the fp16 outlier path")
    compute_dtype: DTypeName = Field("fp16", description="dtype of the non-quantized modules and activations")


class FourBitOptions(Options):
    compute_dtype: DTypeName = "bf16"
    double_quant: bool = False


class DoubleQuantOptions(FourBitOptions):
    double_quant: bool = Field(True, description="always on for nf4-dq")


def _int8(opts: Int8Options, device: str) -> LoadPlan:
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=opts.threshold)
    return LoadPlan({"quantization_config": cfg, "dtype": torch_dtype(opts.compute_dtype)},
                    f"bitsandbytes LLM.int8 (threshold {opts.threshold:g})")


def _four_bit(quant_type: str):
    def build(opts: FourBitOptions, device: str) -> LoadPlan:
        from transformers import BitsAndBytesConfig

        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=torch_dtype(opts.compute_dtype),
            bnb_4bit_use_double_quant=opts.double_quant,
        )
        return LoadPlan({"quantization_config": cfg, "dtype": torch_dtype(opts.compute_dtype)},
                        f"bitsandbytes {quant_type} (compute {opts.compute_dtype}, double quant {opts.double_quant})")

    return build


def _quant_state_tensors(qs) -> list:
    out = []
    for v in vars(qs).values():
        if hasattr(v, "data_ptr"):
            out.append(v)
        elif v is not None and hasattr(v, "absmax"):  # the nested state of double quantization
            out.extend(_quant_state_tensors(v))
    return out


def stored(module) -> Stored | None:
    """Linear4bit: the packed weight counted by its quant_state's shape, plus absmax, nested scales and code books;
    Linear8bitLt: the int8 weight plus SCB (the per-row scales)."""
    w = getattr(module, "weight", None)
    qs, scb = getattr(w, "quant_state", None), getattr(w, "SCB", None)
    if qs is None and scb is None:
        return None
    tensors = [w] + (_quant_state_tensors(qs) if qs is not None else []) + ([scb] if scb is not None else [])
    return Stored(math.prod(qs.shape) if qs is not None else w.numel(), tensors)  # (a bias counts as any parameter)


def _bf16(opts) -> bool:
    return opts.compute_dtype == "bf16"


def _vllm_four_bit(quant_type: str) -> dict:
    """vLLM quantizes with bitsandbytes in flight to nf4 with double quantization only, computing in the dtype it
    is given."""
    def reason(opts) -> str | None:
        if quant_type != "nf4":
            return "vLLM quantizes with bitsandbytes in flight to nf4 only (fp4 needs a checkpoint saved quantized)"
        if not opts.double_quant:
            return ("vLLM's in-flight bitsandbytes is nf4 with double quantization of the scales: use nf4-dq (or "
                    "nf4 with double_quant: true)")
        return None

    return {"vllm": Served(lambda o: {"quantization": "bitsandbytes", "dtype": TORCH_DTYPES[o.compute_dtype]},
                           reason)}


VLLM_INT8 = {"vllm": Served(reason="vLLM runs LLM.int8 only from a checkpoint saved quantized, not in flight")}


def _method(bits: int, scheme: str = "weight-only", **kw) -> Method:
    return Method("bitsandbytes", "bitsandbytes", scheme, bits, ("bitsandbytes",), **kw)


PRECISIONS = (
    # with a threshold, LLM.int8 takes the input columns whose largest value passes it out of the int8 matmul, per
    # input matrix: which windows share a forward pass changes the numbers (seen on an H200: SmolLM2 22.0331 with 8
    # windows per pass, 22.015 one at a time)
    Precision("int8", "bitsandbytes LLM.int8: int8 weights and activations multiplied in int8, input columns with "
                      "an outlier above the threshold in fp16",
              _method(8, "weight+activation", batch_invariant=lambda o: o.threshold == 0),
              Loading(Int8Options, _int8, storage=stored),
              Limits(needs_bf16=_bf16,
                     compile_reason_cuda="its first compiled cell failed on an H200 (torch 2.11, bitsandbytes 0.50.2) "
                                         "with 'storage data ptrs are not allocated in pool' from CUDA graph trees"),
              launch_cost=lambda o: 3.9 if o.threshold > 0 else 2.4, engines=VLLM_INT8),
    Precision("nf4", "bitsandbytes 4-bit NormalFloat", _method(4), Loading(FourBitOptions, _four_bit("nf4"),
                                                                          storage=stored),
              Limits(needs_bf16=_bf16), launch_cost=lambda o: 1.9, engines=_vllm_four_bit("nf4")),
    Precision("fp4", "bitsandbytes 4-bit float", _method(4), Loading(FourBitOptions, _four_bit("fp4"), storage=stored),
              Limits(needs_bf16=_bf16), launch_cost=lambda o: 1.4, engines=_vllm_four_bit("fp4")),
    Precision("nf4-dq", "bitsandbytes nf4 with double quantization of the scales", _method(4),
              Loading(DoubleQuantOptions, _four_bit("nf4"), storage=stored), Limits(needs_bf16=_bf16),
              launch_cost=lambda o: 2.0, engines=_vllm_four_bit("nf4")),
)
