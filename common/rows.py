"""Rows: what every row of a unit carries, a cell's own fields, and the rows of cells that did not run (skipped,
failed, timed out). Plain data, no torch, numpy or pydantic: the driver, failure rows and stand-in runners (tests,
bench) import it in milliseconds."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from common.catalog import measurement_version
from common.units import CellSpec, ModelSpec, UnitSpec


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def weights_note(model: ModelSpec) -> str | None:
    if model.synthetic:
        return "synthetic weights (random, seed 0): latency and memory only, no perplexity"
    if model.source == "gguf":
        kind = re.search(r"(IQ\d\w*|Q\d+(?:_[A-Z0-9]+)*|BF16|F16|F32)", model.location, re.I)
        kind = kind.group(1).upper() if kind else "unknown type"
        return (f"GGUF source ({kind}): weights were quantized before release; full-precision rows hold the "
                f"dequantized {kind} weights")
    return None


def unit_rows_base(unit: UnitSpec) -> dict:
    p, g, ppl = unit.precision, unit.generation, unit.perplexity
    return {
        "sweep": unit.sweep,
        "run_id": unit.run_id,
        "unit_id": unit.unit_id,
        "attempt": unit.attempt,
        "engine": unit.engine,
        "model": unit.model.label,
        "model_spec": json.dumps(unit.model.identity(), sort_keys=True),
        "weights_note": weights_note(unit.model),
        "precision": p.label,
        "baseline": unit.baseline,
        "precision_name": p.name,
        "precision_description": p.description,
        "precision_options": json.dumps(p.options, sort_keys=True),
        "warmup": g.warmup,
        "repeats": g.repeats,
        "gpus_per_task": unit.gpus,
        "cpus_per_task": unit.cpus,
        "ppl_protocol": ppl.protocol if ppl else None,
        "ppl_seqlen": ppl.seqlen if ppl else None,
        "ppl_stride": ppl.stride if ppl and ppl.protocol == "strided" else None,
        "ppl_max_windows": ppl.max_windows if ppl else None,
        "ppl_batch_size": ppl.batch_size if ppl else None,
        "ppl_dataset": ppl.dataset if ppl else None,
        "ppl_dataset_sha256": ppl.sha256 if ppl else None,
        "quality_key": unit.quality_key,
    }


def cell_fields(cell: CellSpec) -> dict:
    return {"cell_key": cell.key, "prompt_tokens": cell.prompt_tokens, "new_tokens": cell.new_tokens,
            "batch_size": cell.batch_size, "decode": cell.decode,
            "measurement_version": measurement_version(cell.decode),
            "kv_cache": cell.kv.label, "kv_cache_options": json.dumps(cell.kv.options, sort_keys=True)}


def failure_rows(unit: UnitSpec, cells, status: str, error_type: str, message: str, tb: str | None = None) -> list[dict]:
    """Rows of cells that did not run or did not finish: skipped (with the reason), error, oom, timeout."""
    base = unit_rows_base(unit)
    t = now()
    return [{**base, **cell_fields(c), "status": status, "error_type": error_type, "error_message": message,
             "traceback": tb, "started_at": t, "ended_at": t} for c in cells]
