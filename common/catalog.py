"""What driver, worker and report look up by name: the measurement version, the WikiText-2 files, the KV caches,
the GPUs' compute capabilities and bandwidths. Plain data and small functions over it."""
from __future__ import annotations

# The version of the measurement code, part of every cell key: bump it when a change makes numbers incomparable with
# earlier rows (CHANGELOG.md says what each version changed; reports/migrate.py upgrades older rows on read).
MEASUREMENT_VERSION = 3
DECODE_VERSIONS = {"compiled": 4}  # a decode path's own version, where its measurement changed alone

# NVML's energy counter moves in steps (every 100 ms on an H200) and a reading lags by up to one step at each end of a
# window: every energy window spans at least this long, and each figure carries the counter's bound (tasks.energy)
ENERGY_WINDOW_S = 2.0


def measurement_version(decode: str) -> int:
    return DECODE_VERSIONS.get(decode, MEASUREMENT_VERSION)

# --------------------------------------------------------------------------------------------------------- datasets
WIKITEXT2_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
HUB_DATASET = "wikitext/wikitext-2-raw-v1/test"
HUB_VALIDATION = "hub:wikitext/wikitext-2-raw-v1/validation"
RANDOM_IDS = "random token ids (seed 0)"  # the calibration data of a model without a tokenizer (synthetic weights)

# ------------------------------------------------------------------------------------------------------- KV caches
# name -> (who quantizes it, bits); None: the native cache (in the model's dtype). quanto-* and hqq-*: transformers'
# QuantizedCache (per group of q_group_size, a full-precision residual); fp8: vLLM's fp8 (e4m3) cache, scaled per tensor
KV_CACHES: dict[str, tuple[str, int] | None] = {
    "native": None,
    "quanto-int4": ("quanto", 4), "quanto-int2": ("quanto", 2),
    "hqq-int8": ("hqq", 8), "hqq-int4": ("hqq", 4), "hqq-int2": ("hqq", 2),
    "fp8": ("vllm", 8),
}
KV_ENGINES = {name: ("vllm",) if spec and spec[0] == "vllm" else ("hf",) if spec else ("hf", "vllm")
              for name, spec in KV_CACHES.items()}  # which engines run each cache
KV_GROUPED = {name for name, spec in KV_CACHES.items() if spec and spec[0] in ("quanto", "hqq")}  # take KV_DEFAULTS
KV_LIBRARIES = {"quanto": ("optimum-quanto", "quanto"), "hqq": ("hqq", "hqq")}  # backend -> (distribution, extra)
KV_DEFAULTS = {"q_group_size": 64, "residual_length": 128}  # a grouped cache's options (orchestrator.grid checks)
KV_COMPILE_REASON = ("a quantized KV cache is dynamic (dequantized, concatenated and re-quantized as it grows); the "
                     "compiled decode path needs a static cache")


# vLLM (0.26) attends with FlashAttention 3 on compute capability 9.x, which reads an fp8 KV cache with queries in fp8
# too and then writes bf16 only: a model in fp16 fails at its first step (measured on an H100)
KV_FP8_FP16_REASON = ("kv_cache fp8 on vLLM with fp16 activations on compute capability 9.x: its FlashAttention 3 "
                      "writes bf16 only beside an fp8 cache (RuntimeError at the first step on an H100); use bf16 "
                      "activations (precision bf16, or compute_dtype: bf16)")


def kv_dtype_reason(kv_name: str, engine: str, dtype: str | None, capability: tuple[int, int] | None) -> str | None:
    """Why this KV cache cannot sit beside activations of this dtype (vLLM's `dtype`) on this GPU, or None (also
    where the GPU is not known before start: the unit then fails on it and says so)."""
    if engine == "vllm" and kv_name == "fp8" and dtype == "float16" and capability and capability[0] == 9:
        return KV_FP8_FP16_REASON
    return None


def kv_label(name: str, options: dict) -> str:
    """The cache's name plus the options that differ from the defaults, e.g. hqq-int4(residual_length=64)."""
    defaults = KV_DEFAULTS if name in KV_GROUPED else {}
    changed = {k: v for k, v in options.items() if defaults.get(k) != v}
    return name + ("(" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + ")" if changed else "")


def kv_reason(kv_name: str, decode: str, engine: str = "hf") -> str | None:
    """Why a cell with this KV cache cannot run with this decode path on this engine (or here: its library not
    installed), or None."""
    if engine not in KV_ENGINES[kv_name]:
        return f"kv_cache {kv_name} runs on {' and '.join(KV_ENGINES[kv_name])} only, not on {engine}"
    if engine == "hf" and decode == "compiled" and kv_name in KV_GROUPED:
        return f"kv_cache {kv_name} with decode: compiled: {KV_COMPILE_REASON}"
    library = KV_LIBRARIES.get((KV_CACHES[kv_name] or ("",))[0])
    how = library and not_installed(*library)
    if how:
        return f"kv_cache {kv_name} needs {library[0]}, not installed: {how}"
    return None


def not_installed(distribution: str, extra: str | None = None) -> str | None:
    """How to install `distribution` where it is not installed (found from installed distributions' metadata,
    nothing imported): the project's extra that brings it, else the distribution itself; None where installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(distribution)
        return None
    except PackageNotFoundError:
        return f"pip install -e '.[{extra}]'" if extra else f"pip install {distribution}"


# ---------------------------------------------------------------------------------------------------------- GPUs
# Ray's accelerator types (the `accelerator_type:<name>` node resource) -> compute capability, to know before a sweep
# starts which precisions a cluster's GPUs cannot run
ACCELERATOR_CAPABILITY = {"V100": (7, 0), "T4": (7, 5), "A10G": (8, 6), "A10": (8, 6), "A100": (8, 0),
                          "L4": (8, 9), "L40S": (8, 9), "H100": (9, 0), "H200": (9, 0), "B200": (10, 0)}

# Datasheet peak memory bandwidth, GB/s. Matched against the CUDA device name, most specific first.
PEAK_BANDWIDTH_GBS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 4800.0),
    (("H100", "NVL"), 3900.0),
    (("H100", "PCIE"), 2000.0),
    (("H100",), 3350.0),            # SXM (HBM3): "NVIDIA H100 80GB HBM3"
    (("A100", "80GB", "PCIE"), 1935.0),
    (("A100", "80GB"), 2039.0),
    (("A100",), 1555.0),            # 40GB
    (("A10G",), 600.0),
    (("L40S",), 864.0),
    (("L4",), 300.0),
    (("T4",), 320.0),
]


def capability_of(accelerator: str | None) -> tuple[int, int] | None:
    """Compute capability of a Ray accelerator type name (e.g. "T4", "A100-80G"), None if unknown."""
    if not accelerator:
        return None
    name = accelerator.upper()
    return ACCELERATOR_CAPABILITY.get(name) or ACCELERATOR_CAPABILITY.get(name.split("-")[0])


def datasheet_bandwidth_gbs(device_name: str) -> float | None:
    name = device_name.upper()
    for words, gbs in PEAK_BANDWIDTH_GBS:
        if all(w in name for w in words):
            return gbs
    return None
