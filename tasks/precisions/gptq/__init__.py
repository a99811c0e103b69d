"""GPTQ and AWQ (calibrated, weight-only) through gptqmodel 7.6: calibrated once into a cached checkpoint
(calibration.py beside this file), then loaded through transformers (GPTQConfig / AwqConfig in the checkpoint) like any other
precision. Calibration text: the WikiText-2 *validation* split by default (the driver refuses the test split);
calibration time is the `calibration_s` column."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from tasks.precisions.base import Limits, Loading, LoadPlan, Method, Options, Precision, Served, Stored


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


def _loading(name: str, options) -> Loading:
    def build(opts, device: str) -> LoadPlan:
        import torch

        from tasks.precisions.gptq.calibration import quant_config_text

        kwargs = {"dtype": torch.float16}
        if opts.kernel != "auto":
            from transformers import AwqConfig, GPTQConfig

            cls = AwqConfig if name == "awq" else GPTQConfig
            kwargs["quantization_config"] = cls(bits=opts.bits, group_size=opts.group_size, backend=opts.kernel)
        return LoadPlan(kwargs, quant_config_text(name, opts))

    def prepare(source: str, opts, device: str, text: bytes | None, text_name: str | None, synthetic: bool):
        from tasks.precisions.gptq.calibration import quantized_folder

        return quantized_folder(source, name, opts, device, text, text_name, synthetic)

    return Loading(options, build, prepare=prepare, storage=stored)


def machete_picked(method: str, opts, capability: tuple[int, int] | None) -> bool:
    """Whether gptqmodel 7.6's kernel auto loads this GPTQ checkpoint with Machete (as it did on an H200)."""
    return (method == "gptq" and opts.kernel == "auto" and capability == (9, 0) and opts.bits in (4, 8)
            and opts.group_size in (-1, 64, 128))


def shape_problem(method: str, opts, widths: dict[str, int], capability: tuple[int, int] | None = None) -> str | None:
    """Why a model's projection widths do not fit the method's groups or the kernel it will load with (gptqmodel
    finds out only after calibrating, in the matmul, or while building the model). `capability`: the GPU's, if
    known."""
    for name in ("hidden_size", "intermediate_size"):
        d = widths.get(name)
        if d and opts.group_size > 0 and d % opts.group_size:
            return f"{method}: group_size {opts.group_size} does not divide the model's {name} {d}"
    if method == "awq":  # its clip search takes output channels 64 at a time
        for name, d in widths.items():
            if d % 64:
                return f"awq: the model's {name} {d} is not a multiple of 64 (gptqmodel's AWQ clip search needs it)"
    if machete_picked(method, opts, capability):
        # seen on an H200: kernel auto is Machete there, whose layers refuse other widths while the model is built
        for name, d in widths.items():
            if d % 128:
                return (f"gptq: with kernel auto, gptqmodel 7.6 loads {opts.bits}-bit GPTQ on compute capability 9.0 "
                        f"with its Machete kernel, which needs every projection width to be a multiple of 128; the "
                        f"model's {name} is {d} (NotImplementedError on an H200); choose another kernel "
                        f"(e.g. `kernel: torch`)")
    return None


def _shape_reason(name: str):
    def reason(opts, widths: dict, capability) -> str | None:
        return shape_problem(name, opts, widths, capability)

    return reason


def stored(module) -> Stored | None:
    """gptqmodel's packed layers keep their weights in int32 buffers (qweight, qzeros, scales, g_idx): counted by the
    layer's logical shape; the buffers themselves are counted with every other buffer. (quanto's qweight is a
    property, not a buffer: not this.)"""
    if "qweight" in getattr(module, "_buffers", {}) and hasattr(module, "in_features"):
        return Stored(module.in_features * module.out_features, [])
    return None


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


METHOD = Method("gptqmodel", "gptqmodel", "weight-only", lambda o: o.bits, ("gptqmodel",), extra="gptq")


def _vllm(method: str) -> dict:
    """vLLM loads the calibrated checkpoint this backend writes, and picks its own kernel for it (Marlin on compute
    capability 8.0 and newer): `kernel` chooses gptqmodel's kernel under transformers only."""
    def reason(opts) -> str | None:
        if opts.kernel != "auto":
            return (f"kernel {opts.kernel} chooses gptqmodel's kernel under transformers; vLLM picks its own for the "
                    f"checkpoint (Marlin): use kernel auto")
        return None

    return {"vllm": Served(lambda o: {"dtype": "float16"}, reason, lambda o: checkpoint_config(method, o))}


def checkpoint_config(method: str, opts) -> dict:
    """The quantization_config of the checkpoint gptqmodel writes for these options (what vLLM picks its kernel by)."""
    if method == "awq":
        return {"quant_method": "awq", "bits": opts.bits, "group_size": opts.group_size, "zero_point": True,
                "version": "gemm"}
    return {"quant_method": "gptq", "bits": opts.bits, "group_size": opts.group_size, "desc_act": opts.act_order,
            "sym": opts.sym}


PRECISIONS = (
    Precision("gptq", "GPTQ (calibrated, second-order weight rounding), gptqmodel 7.6", METHOD,
              _loading("gptq", GptqOptions),
              Limits(compile_reason_cuda=_marlin_compile_cuda("gptq", ("marlin",)), shape_reason=_shape_reason("gptq")),
              launch_cost=lambda o: 2.0, engines=_vllm("gptq")),
    Precision("awq", "AWQ (calibrated, activation-aware scaling), gptqmodel 7.6, GEMM format", METHOD,
              _loading("awq", AwqOptions),
              Limits(compile_reason_cuda=_marlin_compile_cuda("awq", ("auto", "marlin")), shape_reason=_shape_reason("awq")),
              launch_cost=lambda o: 2.0, engines=_vllm("awq")),
)
