"""bitsandbytes: LLM.int8 and the 4-bit formats (nf4, fp4, nf4 with double quantization).

bitsandbytes 0.50 runs all of them on CUDA and on CPU. Every option that changes a number is an option here and is
recorded on each row: the int8 outlier threshold (transformers' default 6.0; optimum-benchmark uses 0.0, which decodes
several times faster), the 4-bit compute dtype and double quantization.
"""
from __future__ import annotations

from pydantic import Field

from tasks.precisions.base import DTypeName, Options, Precision, torch_dtype


class Int8Options(Options):
    threshold: float = Field(6.0, ge=0, description="LLM.int8 outlier threshold; 0 disables the fp16 outlier path")
    compute_dtype: DTypeName = Field("fp16", description="dtype of the non-quantized modules and activations")


class FourBitOptions(Options):
    compute_dtype: DTypeName = "bf16"
    double_quant: bool = False


class DoubleQuantOptions(FourBitOptions):
    double_quant: bool = Field(True, description="always on for nf4-dq")


def _int8(opts: Int8Options, device: str) -> dict:
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=opts.threshold)
    return {"quantization_config": cfg, "dtype": torch_dtype(opts.compute_dtype)}


def _four_bit(quant_type: str):
    def build(opts: FourBitOptions, device: str) -> dict:
        from transformers import BitsAndBytesConfig

        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=torch_dtype(opts.compute_dtype),
            bnb_4bit_use_double_quant=opts.double_quant,
        )
        return {"quantization_config": cfg, "dtype": torch_dtype(opts.compute_dtype)}

    return build


def _bf16(opts) -> bool:
    return opts.compute_dtype == "bf16"


DEVICES = ("cuda", "cpu")
BNB = {"library": "bitsandbytes", "scheme": "weight-only"}
PRECISIONS = (
    Precision("int8", "bitsandbytes LLM.int8 (8-bit weights, fp16 outliers)", DEVICES, Int8Options, _int8,
              needs_bf16=_bf16, weight_bits=8, launch_cost=lambda o: 3.9 if o.threshold > 0 else 2.4,
              compile_reason_cuda="its first compiled cell failed on an H200 (torch 2.11, bitsandbytes 0.50.2) with "
                                  "'storage data ptrs are not allocated in pool' from CUDA graph trees", **BNB),
    Precision("nf4", "bitsandbytes 4-bit NormalFloat", DEVICES, FourBitOptions, _four_bit("nf4"), needs_bf16=_bf16,
              weight_bits=4, launch_cost=lambda o: 1.9, **BNB),
    Precision("fp4", "bitsandbytes 4-bit float", DEVICES, FourBitOptions, _four_bit("fp4"), needs_bf16=_bf16,
              weight_bits=4, launch_cost=lambda o: 1.4, **BNB),
    Precision("nf4-dq", "bitsandbytes nf4 with double quantization of the scales", DEVICES, DoubleQuantOptions,
              _four_bit("nf4"), needs_bf16=_bf16, weight_bits=4, launch_cost=lambda o: 2.0, **BNB),
)
