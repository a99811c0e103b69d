"""What the host does for one compiled decode step, per precision (issue 16: torchao-int4wo's compiled decode on an
H200 was host-bound, 11-30f). A synthetic Llama with many layers and tiny matrices (so the step's arithmetic is
small and the host's work shows), loaded at each precision through the engine, its decode step compiled as a cell
compiles it (`model.compiled_decode()`, static cache); after warm-up, STEPS steps under cProfile. Per step: the
Python calls that grow with the number of quantized weights (dynamo's metadata guard of a tensor subclass,
`metadata_checker`; AOTAutograd's flattening of a subclass input, `__tensor_flatten__`), and the host's seconds with
and without the profiler. The counts are exact; the seconds are this machine's.

  python bench/step_host_cost.py [--precisions fp32 torchao-int4wo torchao-int4wo:unwrap=true] [--layers 30]
                                 [--steps 50] [--device cpu]      (NAME:KEY=VALUE,...: a precision's options)
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PER_WEIGHT = ("metadata_checker", "__tensor_flatten__")  # Python calls made once or more per subclass weight


def measure(entry: str, layers: int, steps: int, device: str) -> dict:
    import torch
    import yaml

    from spec.units import ModelSpec
    from tasks.engines import hf
    from tasks.precisions import REGISTRY

    shapes = {"family": "llama", "hidden_size": 128, "layers": layers, "heads": 4, "kv_heads": 2, "ffn": 256,
              "vocab": 1000}
    name, _, given = entry.partition(":")
    options = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in given.split(",") if kv)}
    p = REGISTRY[name]
    model = hf.load(ModelSpec("synthetic", shapes, "step-host-cost"), p, p.parse_options(options), device)
    step, prompt = model.compiled_decode(), 16
    cache = model.new_cache(None, prompt + 2 * steps + 8)
    ids = torch.randint(0, 1000, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        token = model.prefill(ids, cache, torch.arange(prompt, device=device))
        pos = prompt

        def run(n: int) -> float:
            nonlocal token, pos
            t0 = time.perf_counter()
            for _ in range(n):
                token = step(token, cache, torch.arange(pos, pos + 1, device=device)).clone()
                pos += 1
            sync()
            return time.perf_counter() - t0

        compile_s = run(1)
        run(3)
        plain_s = run(steps // 2)
        profiler = cProfile.Profile()
        profiler.enable()
        profiled_s = run(steps // 2)
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (primitive calls, calls, tottime, cumtime, ...)}
    n = steps // 2
    calls = {k: sum(v[1] for (f, _, fn), v in stats.items() if fn == k) / n for k in PER_WEIGHT}
    subclass = sum(1 for m in model.module.modules() if isinstance(m, torch.nn.Linear)
                   and hasattr(m.weight, "__tensor_flatten__"))  # a traceable tensor subclass (torchao's)
    return {"precision": entry, "quant_config": model.facts.get("quant_config"), "device": device, "layers": layers,
            "linear_weights_traceable_subclass": subclass,
            "linear_type": hf.linear_class(model.module),
            "compile_s": round(compile_s, 2), "step_ms": round(plain_s / n * 1e3, 3),
            "step_ms_profiled": round(profiled_s / n * 1e3, 3),
            **{f"{k}_per_step": c for k, c in calls.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "torchao-int4wo", "torchao-int4wo:unwrap=true"])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(json.dumps([measure(p, a.layers, a.steps, a.device) for p in a.precisions], indent=1))


if __name__ == "__main__":
    main()
