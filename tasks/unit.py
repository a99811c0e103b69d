"""The one entry point of tasks/: `run_unit(unit)` loads one model at one precision, measures perplexity once, then
measures every (new_tokens, batch_size) cell of that pair, yielding one row per cell as soon as it is done.

A unit is plain data (see orchestrator.plan.Unit.to_task): model entry, precision name and options, cells with their
keys, generation and perplexity settings, GPUs asked for. Failures never escape: a load that fails makes every cell a
failure row; a cell that fails (out of memory included) becomes a failure row and the next cell goes on.
"""
from __future__ import annotations

import os
import time
import traceback
from typing import Iterator

from tasks import kv_cache, latency, memory, models, perplexity
from tasks.hardware import fingerprint, peak_bandwidth
from tasks.precisions import REGISTRY
from tasks.rows import cell_fields, now, unit_rows_base

# imported once by the worker's fork server (tasks.unit_process), so that each unit's fresh process starts warm. None
# of these may initialise CUDA, or no child could use it ("Cannot re-initialize CUDA in forked subprocess"): not
# transformers.modeling_utils, which imports torchao and hqq when installed, and torchao's import queries the GPU's
# compute capability (found on the GPU host; tests/test_methods.py checks that no quantization library is preloaded)
PRELOAD = ("torch", "transformers", "accelerate", "numpy")
NEVER_PRELOAD = ("torchao", "hqq", "bitsandbytes", "gptqmodel", "optimum.quanto", "transformers.modeling_utils")
_loads = 0  # models loaded by this process; each unit runs in a process of its own


def pick_device(gpus: float) -> str:
    import torch

    return "cuda:0" if gpus > 0 and torch.cuda.is_available() else "cpu"


OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")  # CUDA; CPU allocator; errno ENOMEM


def _is_oom(exc: BaseException) -> bool:
    """Memory the cell asked for and could not have: a GPU or host allocation that failed."""
    import torch

    text = str(exc).lower()
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or any(t in text for t in OOM_TEXT)


def _failure(exc: BaseException) -> dict:
    return {
        "status": "oom" if _is_oom(exc) else "error",
        "error_type": type(exc).__name__,
        "error_message": str(exc)[:2000],
        "traceback": traceback.format_exc()[-8000:],
    }


def run_unit(unit: dict, wikitext: bytes | None = None) -> Iterator[dict]:
    """Yield one row per cell of the unit. `wikitext`: the raw test-split bytes the driver read and checked, or None
    for the hub dataset (or when perplexity is off)."""
    global _loads
    import torch

    started = now()
    base = unit_rows_base(unit)
    device = pick_device(unit["gpus"])
    env = fingerprint(device)
    base.update(env)
    precision = REGISTRY[unit["precision"]["name"]]
    options = precision.parse_options(unit["precision"]["options"])
    bf16_ok = torch.cuda.is_bf16_supported() if device.startswith("cuda") else True

    def rows_for_remaining(cells, fields):
        for cell in cells:
            yield {**base, **cell_fields(cell), "started_at": started, "ended_at": now(), **fields}

    capability = torch.cuda.get_device_capability(device) if device.startswith("cuda") else None
    reason = precision.unsupported_reason(env["device"], options, bf16_ok, capability)
    if reason:
        yield from rows_for_remaining(unit["cells"], {"status": "skipped", "error_type": "Unsupported",
                                                      "error_message": reason})
        return

    t_load = time.perf_counter()
    try:
        model, tokenizer, facts = models.load(unit["model"], precision, options, device, calibration_text(unit))
        _loads += 1
        facts.update(models.weight_stats(model))
        facts["model_loads_in_worker"] = _loads
        if device.startswith("cuda"):
            facts["weights_allocated_bytes"] = memory.allocated(device)
        facts["rss_after_load_bytes"] = memory.rss()
    except Exception as exc:
        yield from rows_for_remaining(unit["cells"], {**_failure(exc), "load_s": time.perf_counter() - t_load})
        return
    base.update(facts)
    base.update(measure_perplexity(unit, model, tokenizer, wikitext, device))
    geometry = models.kv_geometry(model.config)
    bw_gbs, bw_source = peak_bandwidth(device)
    base.update(peak_bandwidth_gbs=bw_gbs, peak_bandwidth_source=bw_source)

    kv_quality: dict[str, dict] = {}  # kv_cache label -> kv-continuation perplexity, measured once per unit
    for cell in unit["cells"]:
        cell_started = now()
        t0 = time.perf_counter()
        row = {**base, **cell_fields(cell), "started_at": cell_started}
        kv = cell.get("kv_cache")
        decode = cell.get("decode", "eager")
        reason = (precision.decode_reason(decode, env["device"], options, cell["batch_size"])  # skipped before start
                  or (kv and kv_cache.decode_reason(kv, decode)))
        if reason:
            row.update(status="skipped", error_type="Unsupported", error_message=reason, ended_at=now())
            yield row
            continue
        if (unit.get("perplexity") or {}).get("kv"):
            label = kv["label"] if kv else "native"
            if label not in kv_quality:
                kv_quality[label] = measure_kv_perplexity(unit, model, tokenizer, wikitext, device, kv)
            row.update(kv_quality[label])
        others = memory.other_gpu_processes(device)  # before and after: whatever shared the GPU meanwhile
        try:
            row.update(measure_latency_memory(model, tokenizer, device, unit, cell, geometry, facts, bw_gbs))
            row["status"] = "ok"
        except Exception as exc:
            row.update(_failure(exc))
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        row.update(_sharing(others, memory.other_gpu_processes(device)))
        row["latency_s"] = time.perf_counter() - t0
        row["host_load_1m"] = os.getloadavg()[0]
        row["ended_at"] = now()
        yield row


def _sharing(before: dict | None, after: dict | None) -> dict:
    """Other processes seen on the unit's GPU when the cell started or ended (None where NVML cannot tell)."""
    if before is None and after is None:
        return {}
    seen = {**(before or {}), **(after or {})}
    return {"gpu_other_processes": len(seen), "gpu_other_process_bytes": sum(b or 0 for b in seen.values()),
            "gpu_other_pids": ",".join(str(p) for p in sorted(seen)) or None}


def calibration_text(unit: dict) -> dict | None:
    """{"text": bytes or None (synthetic weights: random ids), "name"} for calibrated precisions, else None."""
    c = unit.get("calibration")
    if not c:
        return None
    text = c.get("text")
    if text is None and c["name"].startswith("hub:"):
        import datasets

        text = "".join(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="validation")["text"]).encode()
    return {"text": text, "name": c["name"]}


def _test_rows(wikitext: bytes | None) -> list[str]:
    """The test split's rows: from the bytes the driver read and checked, else from the hub."""
    return perplexity.rows_from_raw(wikitext) if wikitext is not None else perplexity.hub_rows()


def measure_perplexity(unit: dict, model, tokenizer, wikitext: bytes | None, device: str) -> dict:
    cfg = unit.get("perplexity")
    if not cfg:
        return {"ppl_skipped_reason": "perplexity off in the grid"}
    if unit["model"].get("synthetic") or tokenizer is None:
        return {"ppl_skipped_reason": "synthetic weights"}
    try:
        return perplexity.perplexity(model, tokenizer, _test_rows(wikitext), protocol=cfg["protocol"],
                                     seqlen=cfg["seqlen"], stride=cfg["stride"], max_windows=cfg["max_windows"],
                                     batch_size=cfg["batch_size"], device=device)
    except Exception as exc:
        f = _failure(exc)
        return {"ppl_error": f"{f['error_type']}: {f['error_message']}", "ppl_status": f["status"]}


def measure_kv_perplexity(unit: dict, model, tokenizer, wikitext: bytes | None, device: str, kv: dict | None) -> dict:
    cfg = unit["perplexity"]
    if unit["model"].get("synthetic") or tokenizer is None:
        return {"ppl_kv_skipped_reason": "synthetic weights"}
    try:
        return perplexity.continuation_perplexity(model, tokenizer, _test_rows(wikitext), kv=kv,
                                                  windows=cfg["kv_windows"], prefill=cfg["kv_prefill"],
                                                  continuation=cfg["kv_continuation"], device=device)
    except Exception as exc:
        f = _failure(exc)
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        return {"ppl_kv_error": f"{f['error_type']}: {f['error_message']}"}


def measure_latency_memory(model, tokenizer, device, unit, cell, geometry, facts, bw_gbs) -> dict:
    import resource

    g = unit["generation"]
    decode = cell.get("decode", "eager")
    kv = cell.get("kv_cache")
    kv = kv if kv and kv["name"] != "native" else None
    record, phases, cache, compile_s, kernels = latency.measure_cell(
        model, tokenizer, device, new_tokens=cell["new_tokens"], batch_size=cell["batch_size"],
        prompt_tokens=g["prompt_tokens"], warmup=g["warmup"], repeats=g["repeats"], decode=decode,
        profile=g.get("profile", False), kv=kv)
    out = record.summary()
    tensor_bytes = kv_cache.stored_bytes(cache)
    # the last token is never fed back; a static cache (compiled decode) is allocated for every position up front
    cached_tokens = g["prompt_tokens"] + cell["new_tokens"] - (0 if decode == "compiled" else 1)
    batch = cell["batch_size"]
    if kv:
        element = kv_cache.residual_element_size(cache) or 2
    else:
        element = tensor_bytes // max(1, kv_cache.analytic_bytes(geometry, 0, cached_tokens, batch, None, 1)) or 2
    analytic = kv_cache.analytic_bytes(geometry, g["prompt_tokens"], cached_tokens, batch, kv, element)
    del cache
    nvml_mine, nvml_used = memory.nvml_process_bytes(device)
    cuda = device.startswith("cuda")
    out.update({
        "kv_cache_bytes": int(analytic),
        "kv_cache_tensor_bytes": tensor_bytes,
        "kv_bytes_per_token": tensor_bytes / (cached_tokens * batch),
        "kv_bytes_per_token_analytic": analytic / (cached_tokens * batch),
        "compile_s": compile_s,
        "top_kernels": kernels,
        "kv_cache_growth_bytes": (phases.after_decode - phases.before) if cuda else None,
        "memory_before_bytes": phases.before if cuda else None,
        "prefill_peak_bytes": phases.prefill_peak,
        "decode_peak_bytes": phases.decode_peak,
        "peak_bytes": max(phases.prefill_peak, phases.decode_peak) if cuda else None,
        "peak_reserved_bytes": memory.peak_reserved(device),
        "alloc_retries": memory.alloc_retries(device),
        "nvml_process_bytes": nvml_mine,
        "nvml_device_used_bytes": nvml_used,
        "rss_bytes": memory.rss(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "kv_layers": geometry["layers"], "kv_heads": geometry["kv_heads"], "head_dim": geometry["head_dim"],
        "kv_bytes_per_element": element,
    })
    # Distance to the hardware limit: what one decode step must read, over the measured step time.
    mean_context = g["prompt_tokens"] + cell["new_tokens"] / 2
    step_bytes = (facts["weights_bytes"] - facts["embedding_unread_bytes"]
                  + kv_cache.analytic_bytes(geometry, g["prompt_tokens"], mean_context, batch, kv, element))
    out["decode_bytes_per_step"] = int(step_bytes)
    if out["decode_ms_per_token"]:
        achieved = step_bytes / (out["decode_ms_per_token"] / 1e3) / 1e9
        out["achieved_bandwidth_gbs"] = achieved
        out["bandwidth_fraction"] = achieved / bw_gbs if bw_gbs else None
        out["decode_ms_floor"] = step_bytes / (bw_gbs * 1e9) * 1e3 if bw_gbs else None
    return out
