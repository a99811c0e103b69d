"""What every row of a unit carries, and a cell's own fields: plain data, no torch, numpy or pydantic, so that the
driver, failure rows and stand-in runners (tests, bench) import it in milliseconds."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone

# 2: the memory run no longer counts the last timed run's KV cache (v1 peaks were one KV cache too high);
#    no_grad instead of inference_mode
MEASUREMENT_VERSION = 2  # bump when a change makes numbers incomparable with earlier rows; part of every cell key


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def weights_note(model: dict) -> str | None:
    if model.get("synthetic"):
        return "synthetic weights (random, seed 0): latency and memory only, no perplexity"
    if model.get("gguf"):
        kind = re.search(r"(IQ\d\w*|Q\d+(?:_[A-Z0-9]+)*|BF16|F16|F32)", model["gguf"], re.I)
        kind = kind.group(1).upper() if kind else "unknown type"
        return (f"GGUF source ({kind}): weights were quantized before release; full-precision rows hold the "
                f"dequantized {kind} weights")
    return None


def unit_rows_base(unit: dict) -> dict:
    p = unit["precision"]
    g = unit["generation"]
    ppl = unit.get("perplexity") or {}
    return {
        "sweep": unit["sweep"],
        "run_id": unit["run_id"],
        "unit_id": unit["unit_id"],
        "attempt": unit.get("attempt", 1),
        "model": unit["model"]["label"],
        "model_spec": json.dumps(unit["model"], sort_keys=True),
        "weights_note": weights_note(unit["model"]),
        "precision": p["label"],
        "baseline": unit.get("baseline"),
        "precision_name": p["name"],
        "precision_options": json.dumps(p["options"], sort_keys=True),
        "prompt_tokens": g["prompt_tokens"],
        "warmup": g["warmup"],
        "repeats": g["repeats"],
        "gpus_per_task": unit["gpus"],
        "cpus_per_task": unit.get("cpus"),
        "ppl_protocol": ppl.get("protocol"),
        "ppl_seqlen": ppl.get("seqlen"),
        "ppl_stride": ppl.get("stride") if ppl.get("protocol") == "strided" else None,
        "ppl_max_windows": ppl.get("max_windows"),
        "ppl_batch_size": ppl.get("batch_size"),
        "ppl_dataset": ppl.get("dataset"),
        "ppl_dataset_sha256": ppl.get("sha256"),
        "measurement_version": MEASUREMENT_VERSION,
    }


def cell_fields(cell: dict) -> dict:
    kv = cell.get("kv_cache") or {"label": "native", "options": {}}
    return {"cell_key": cell["cell_key"], "new_tokens": cell["new_tokens"], "batch_size": cell["batch_size"],
            "decode": cell.get("decode", "eager"), "kv_cache": kv["label"],
            "kv_cache_options": json.dumps(kv["options"], sort_keys=True)}
