"""The one entry point of tasks/: `run_unit(unit)` loads one model at one precision through its engine, measures
perplexity once, then measures every cell of that pair, yielding one row per cell as soon as it is done.

A unit is a common.units.UnitSpec: the model entry, the precision and its options, the cells with their keys, the
generation and perplexity settings, the GPUs asked for. Failures never escape: a load that fails makes every cell a
failure row; a cell that fails (out of memory included) becomes a failure row and the next cell goes on.
"""
from __future__ import annotations

import importlib
import os
import resource
import time
import traceback
from typing import Iterator

import torch

from common.cache import reference_path
from common.catalog import KV_CACHES, kv_reason
from common.rows import cell_fields, now, unit_rows_base
from common.units import CellSpec, UnitSpec
from tasks import distance, engines, kv_cache, latency, memory, perplexity
from tasks.distance import Capture, Reference
from tasks.hardware import fingerprint, peak_bandwidth, roofline
from tasks.precisions import REGISTRY, library_imports

# imported once by the worker's fork server (orchestrator.forkserver), so that each unit's fresh process starts warm.
# None of these may initialise CUDA, or no child could use it ("Cannot re-initialize CUDA in forked subprocess"): not
# the quantization libraries the backends import, and not transformers.modeling_utils, which imports torchao and hqq
# when installed (torchao's import queries the GPU's compute capability; found on the GPU host; tests/test_methods.py
# checks that none of them is preloaded)
# torch's inductor compiler (compile_fx, lowering) and transformers.cache_utils neither: after importing them, a
# forked child cannot use the GPU although torch.cuda.is_initialized() says no: their CUDA availability check calls
# the driver's cuInit, which no fork survives. With PYTORCH_NVML_BASED_CUDA_CHECK=1 torch asks NVML instead, a child
# forked after each still uses the GPU, and QSWEEP_PRELOAD may name them (not the default: import_s does not fall).
CUINIT_ON_IMPORT = ("transformers.cache_utils", "torch._inductor.compile_fx", "torch._inductor.lowering")
NEVER_PRELOAD = library_imports() + ("transformers.modeling_utils",)


def nvml_check() -> bool:
    """torch checks for a GPU through NVML, not the CUDA driver (a forked child can still use the GPU after it)."""
    return os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1"


def extra_preload(names: str) -> tuple[str, ...]:
    """QSWEEP_PRELOAD: more modules for the fork server, comma-separated (those a forked child survives on the GPU
    at hand); the ones in NEVER_PRELOAD are left out, and those in CUINIT_ON_IMPORT unless torch checks for a GPU
    through NVML."""
    refused = NEVER_PRELOAD + (() if nvml_check() else CUINIT_ON_IMPORT)
    wanted = [m.strip() for m in names.split(",") if m.strip()]
    return tuple(m for m in wanted if not any(m == n or m.startswith(n + ".") for n in refused))


# torch._dynamo, torch.distributed.tensor, sympy and networkx: ~6 of a unit's 11 to 12 s of import_s on an H200 host,
# moved into the fork server's start (paid once); a forked child still uses the GPU after each. sklearn.metrics:
# transformers imports it with its generation code whenever scikit-learn is installed (1.5-2 s); preloaded, the
# notebook's import_s falls from 2.1 to 0.95 s. The fork server skips a module that is not installed.
PRELOAD = ("torch", "transformers", "accelerate", "numpy", "torch.distributed.tensor", "torch._dynamo", "sympy",
           "networkx", "sklearn.metrics") + extra_preload(os.environ.get("QSWEEP_PRELOAD", ""))
_loads = 0  # models loaded by this process; each unit runs in a process of its own


def import_preload() -> None:
    """Import PRELOAD as the fork server does (multiprocessing's fork server skips a module that is not installed):
    for the benches and tests that stand in for it."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")  # CUDA; CPU allocator; errno ENOMEM


def pick_device(gpus: float) -> str:
    return "cuda:0" if gpus > 0 and torch.cuda.is_available() else "cpu"


def _is_oom(exc: BaseException) -> bool:
    """Memory the cell asked for and could not have: a GPU or host allocation that failed."""
    text = str(exc).lower()
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or any(t in text for t in OOM_TEXT)


def _failure(exc: BaseException) -> dict:
    return {
        "status": "oom" if _is_oom(exc) else "error",
        "error_type": type(exc).__name__,
        "error_message": str(exc)[:2000],
        "traceback": traceback.format_exc()[-8000:],
    }


def run_unit_alone(unit: UnitSpec, wikitext: bytes | None = None) -> Iterator[dict]:
    """run_unit in a process of its own (the driver's fork-server child): the engine is told which quantization
    libraries the unit uses (its precision's, its KV caches' backends), so that it may leave the others unimported."""
    libraries = set(REGISTRY[unit.precision.name].method.imports)
    libraries |= {KV_CACHES[c.kv.name][0] for c in unit.cells if KV_CACHES.get(c.kv.name)}
    engines.own_process(unit.engine, libraries)
    yield from run_unit(unit, wikitext)


def run_unit(unit: UnitSpec, wikitext: bytes | None = None) -> Iterator[dict]:
    """Yield one row per cell of the unit. `wikitext`: the raw test-split bytes the driver read and checked, or None
    for the hub dataset (or when perplexity is off)."""
    global _loads

    started, t_setup = now(), time.perf_counter()
    base = unit_rows_base(unit)
    base["unit_started_at"] = started  # the driver's timeline of the unit (sweep.json) is read against it
    device = pick_device(unit.gpus)
    env = fingerprint(device)  # on a GPU this makes the process's CUDA context
    base.update(env)
    precision = REGISTRY[unit.precision.name]
    options = precision.parse_options(unit.precision.options)
    bf16_ok = torch.cuda.is_bf16_supported() if device.startswith("cuda") else True

    def rows_for_remaining(cells, fields):
        for cell in cells:
            yield {**base, **cell_fields(cell), "started_at": started, "ended_at": now(), **fields}

    capability = torch.cuda.get_device_capability(device) if device.startswith("cuda") else None
    reason = precision.engine_reason(unit.engine, options) or \
        precision.unsupported_reason(env["device"], options, bf16_ok, capability) or \
        (precision.kv_reason(unit.engine, unit.cells[0].kv.name, options, capability) if unit.cells else None)
    if reason:
        yield from rows_for_remaining(unit.cells, {"status": "skipped", "error_type": "Unsupported",
                                                   "error_message": reason})
        return

    if unit.reference_only and reference_path(unit.reference.key).is_file():
        yield {"_event": "reference", "key": unit.reference.key, "path": str(reference_path(unit.reference.key))}
        return
    t_load = time.perf_counter()
    base["unit_setup_s"] = t_load - t_setup
    try:
        model = engines.load(unit.engine, unit.model, precision, options, device, calibration_text(unit), unit)
        _loads += 1
        facts = {**model.facts, **model.weight_stats(), "model_loads_in_worker": _loads,
                 "rss_after_load_bytes": memory.rss()}
        if device.startswith("cuda"):  # (an engine that allocates more than weights at load says what they take)
            facts.setdefault("weights_allocated_bytes", memory.allocated(device))
    except Exception as exc:
        yield from rows_for_remaining(unit.cells, {**_failure(exc), "load_s": time.perf_counter() - t_load})
        return
    base.update(facts, load_wall_s=time.perf_counter() - t_load)
    t_quality = time.perf_counter()
    quality, reference = measure_quality(unit, model, wikitext, device)
    base.update(quality, quality_wall_s=time.perf_counter() - t_quality)
    base.update({k: v for k, v in model.facts.items() if k not in base})  # what scoring found out (vLLM's check)
    if reference:  # the baseline's reference for the model's other units: the driver hands it to them
        yield {"_event": "reference", "key": unit.reference.key, "path": reference}
    bw_gbs, bw_source = peak_bandwidth(device)
    base.update(peak_bandwidth_gbs=bw_gbs, peak_bandwidth_source=bw_source)
    if unit.generation.throughput:
        base.update(measure_throughput(model, device, unit))

    kv_quality: dict[str, dict] = {}  # kv_cache label -> kv-continuation perplexity, measured once per unit
    for cell in unit.cells:
        t0 = time.perf_counter()
        row = {**base, **cell_fields(cell), "started_at": now()}
        hf = unit.engine == "hf"  # known before start: the decode paths and caches the backend and engine cannot run
        reason = ((precision.decode_reason(cell.decode, env["device"], options, cell.batch_size) if hf else None)
                  or kv_reason(cell.kv.name, cell.decode, unit.engine))
        if reason:
            row.update(status="skipped", error_type="Unsupported", error_message=reason, ended_at=now())
            yield row
            continue
        if unit.perplexity and unit.perplexity.through_kv:
            if cell.kv.label not in kv_quality:
                kv_quality[cell.kv.label] = measure_kv_perplexity(unit, model, wikitext, device, cell)
            row.update(kv_quality[cell.kv.label])
        others = memory.other_gpu_processes(device)  # before and after: whatever shared the GPU meanwhile
        try:
            row.update(measure_latency_memory(model, device, unit, cell, facts, bw_gbs))
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


def calibration_text(unit: UnitSpec) -> dict | None:
    """{"text": bytes or None (synthetic weights: random ids), "name"} for calibrated precisions, else None."""
    c = unit.precision.calibration
    if not c:
        return None
    text = c.text
    if text is None and c.name.startswith("hub:"):
        import datasets

        text = "".join(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="validation")["text"]).encode()
    return {"text": text, "name": c.name}


def _test_rows(wikitext: bytes | None) -> list[str]:
    """The test split's rows: from the bytes the driver read and checked, else from the hub."""
    return perplexity.rows_from_raw(wikitext) if wikitext is not None else perplexity.hub_rows()


def measure_quality(unit: UnitSpec, model, wikitext: bytes | None, device: str) -> tuple[dict, str | None]:
    """Perplexity with its interval and, against the baseline's reference, the distance; the baseline unit makes
    that reference here. Returns the columns and the path of a reference made (else None)."""
    cfg, ref = unit.perplexity, unit.reference
    if not cfg:
        return {"ppl_skipped_reason": "perplexity off in the grid"}, None
    if unit.model.synthetic or model.tokenizer is None:
        return {"ppl_skipped_reason": "synthetic weights", "distance_missing": "synthetic weights"}, None
    if unit.known_quality:
        return {**unit.known_quality, "quality_reused": True}, None
    capture = reference = None
    out = {}
    if ref and ref.role == "make":
        capture = None if reference_path(ref.key).is_file() else Capture()  # made by an earlier sweep on this node
    elif ref and ref.missing:
        out["distance_missing"] = ref.missing
    elif ref:
        path = reference_path(ref.key)
        if path.is_file():
            t0 = time.perf_counter()
            reference = Reference(str(path), device)
            out.update(distance_reference=ref.baseline, reference_load_s=time.perf_counter() - t0)
        else:
            out["distance_missing"] = f"the baseline's reference is not on this node ({path})"
    invariant = REGISTRY[unit.precision.name].method.batch_invariant(
        REGISTRY[unit.precision.name].parse_options(unit.precision.options))
    batch = cfg.batch_size or (8 if invariant else 1)  # the default gives the one-window figure where it differs
    out.update(ppl_batch_size=batch, ppl_batch_invariant=invariant)
    try:
        out.update(perplexity.perplexity(model, model.tokenizer, _test_rows(wikitext), protocol=cfg.protocol,
                                         seqlen=cfg.seqlen, stride=cfg.stride, max_windows=cfg.max_windows,
                                         batch_size=batch, device=device, capture=capture, reference=reference))
    except Exception as exc:
        f = _failure(exc)
        return {"ppl_error": f"{f['error_type']}: {f['error_message']}", "ppl_status": f["status"],
                "distance_missing": "perplexity failed"}, None
    if "distance_missing" in out:
        out.pop("distance_reference", None)
    if ref and ref.role == "self":
        out.update(distance.self_columns(out["ppl_tokens_scored"]))
    if ref and ref.role == "make":
        out.update(distance.self_columns(out["ppl_tokens_scored"]))
        if capture is not None and capture.problem:
            out = {**out, **{k: None for k in distance.self_columns(0)}, "distance_missing": capture.problem}
            return out, None
        t0 = time.perf_counter()
        path = capture.save(ref.key, model, out["ppl_window_nll"], out["ppl_window_tokens"], out["perplexity"]) \
            if capture is not None else str(reference_path(ref.key))
        out["reference_save_s"] = time.perf_counter() - t0
        return out, path
    return out, None


def measure_kv_perplexity(unit: UnitSpec, model, wikitext: bytes | None, device: str, cell: CellSpec) -> dict:
    cfg = unit.perplexity
    if unit.model.synthetic or model.tokenizer is None:
        return {"ppl_kv_skipped_reason": "synthetic weights"}
    kv = cell.kv if cell.kv.name != "native" else None
    try:
        return perplexity.continuation_perplexity(model, model.tokenizer, _test_rows(wikitext), kv=kv,
                                                  windows=cfg.kv_windows, prefill=cfg.kv_prefill,
                                                  continuation=cfg.kv_continuation, device=device)
    except Exception as exc:
        f = _failure(exc)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {"ppl_kv_error": f"{f['error_type']}: {f['error_message']}"}


def measure_throughput(model, device: str, unit: UnitSpec) -> dict:
    """The unit's offline throughput figure, on the decode path of its first cell (vLLM: CUDA graphs unless the
    unit is eager); a failure is written on the rows and the cells still run."""
    requests, prompt_tokens, new_tokens = unit.generation.throughput
    decode = unit.cells[0].decode if unit.cells else "eager"
    try:
        return latency.measure_throughput(model, device, requests=requests, prompt_tokens=prompt_tokens,
                                          new_tokens=new_tokens, decode=decode, repeats=unit.generation.repeats)
    except Exception as exc:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {"throughput_missing": f"{type(exc).__name__}: {exc}"[:300]}


def measure_latency_memory(model, device: str, unit: UnitSpec, cell: CellSpec, facts: dict, bw_gbs) -> dict:
    g = unit.generation
    kv = cell.kv if cell.kv.name != "native" else None
    m = latency.measure_cell(
        model, device, new_tokens=cell.new_tokens, batch_size=cell.batch_size, prompt_tokens=cell.prompt_tokens,
        warmup=g.warmup, repeats=g.repeats, decode=cell.decode, profile=g.profile, kv=kv, max_repeats=g.max_repeats,
        max_seconds=g.max_seconds, target_halfwidth=g.target_halfwidth)
    out = {**m.record.summary(), **m.energy, **m.host_cpu, **m.walls, **m.counters, **m.memory.facts,
           "timing_source": m.timing_source}
    mem, compile_s, kernels = m.memory, m.compile_s, m.kernels
    geometry = model.geometry
    out.update(kv_cache.accounting(geometry, mem.cache_bytes, mem.cache_element_size,
                                   cell.prompt_tokens, cell.new_tokens, cell.batch_size, cell.decode, kv))
    del m
    nvml_mine, nvml_used = memory.nvml_process_bytes(device)
    cuda = device.startswith("cuda")
    out.update({
        "compile_s": compile_s,
        "top_kernels": kernels,
        "kv_cache_growth_bytes": (mem.after_decode - mem.before) if cuda else None,
        "memory_before_bytes": mem.before if cuda else None,
        "prefill_peak_bytes": mem.prefill_peak,
        "decode_peak_bytes": mem.decode_peak,
        "peak_bytes": max(mem.prefill_peak, mem.decode_peak) if cuda else None,
        "peak_reserved_bytes": memory.peak_reserved(device),
        "alloc_retries": memory.alloc_retries(device),
        "nvml_process_bytes": nvml_mine,
        "nvml_device_used_bytes": nvml_used,
        "rss_bytes": memory.rss(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    })
    if unit.usd_per_gpu_hour and unit.gpus and out["e2e_tokens_per_s"]:
        out["usd_per_million_tokens"] = unit.usd_per_gpu_hour * unit.gpus / 3600 / out["e2e_tokens_per_s"] * 1e6
    out.update(roofline(facts["weights_bytes"], facts["embedding_unread_bytes"], geometry, cell.prompt_tokens,
                        cell.new_tokens, cell.batch_size, kv, out["kv_bytes_per_element"], out["decode_ms_per_token"],
                        bw_gbs))
    return out
