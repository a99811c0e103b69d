"""A stand-in for tasks.unit.run_unit whose behaviour the model label scripts, for driver tests and the overhead
benchmark. It imports no torch, so workers start fast. Labels:
  sleep-<seconds>    each cell sleeps that long, then is ok
  raise              first cell ok, then a ValueError escapes the unit
  kill-once          first cell ok, then the worker process dies on attempt 1; later attempts finish
  kill-always        the worker dies after its first cell on every attempt
  hang               sleeps forever (for timeouts)
  baseline-fails     the baseline's unit raises before it makes its reference
Quality as the real unit handles it, without a model: a perplexity of 10 (reused when the driver says it is known),
the baseline's reference made as a small file and announced, the distance recorded against it or missing with why.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

from common.cache import reference_path
from common.rows import cell_fields, now, unit_rows_base


def quality(unit) -> tuple[dict, str | None]:
    ref = unit.reference
    if not unit.perplexity:
        return {}, None
    if unit.known_quality:
        return {**unit.known_quality, "quality_reused": True}, None
    out = {"perplexity": 10.0, "ppl_windows": 1}
    if ref and ref.role == "make":
        if unit.model.label == "baseline-fails":
            raise ValueError("scripted: the baseline fails before its reference")
        path = reference_path(ref.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"scripted reference " + ref.key.encode())
        return {**out, "kl_mean": 0.0, "distance_reference": "self (the baseline)"}, str(path)
    if ref and ref.role == "use":
        if ref.missing:
            return {**out, "distance_missing": ref.missing}, None
        if reference_path(ref.key).read_bytes() != b"scripted reference " + ref.key.encode():
            raise ValueError("scripted: the reference on this node is not the baseline's")
        return {**out, "kl_mean": 0.01, "distance_reference": ref.baseline}, None
    return out, None


def run_unit(unit, wikitext: bytes | None = None):
    label = unit.model.label
    base = unit_rows_base(unit)
    base.update(host=socket.gethostname(), worker_pid=os.getpid(),
                cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), model_loads_in_worker=1)
    measured, reference = quality(unit)
    base.update(measured)
    if reference:
        yield {"_event": "reference", "key": unit.reference.key, "path": reference}
    for i, cell in enumerate(unit.cells):
        started = now()
        if label.startswith("sleep-"):
            time.sleep(float(label.split("-", 1)[1].split()[0]))
        elif label == "hang":
            Path(tempfile.gettempdir(), f"scripted-hang-{cell.key}.pid").write_text(str(os.getpid()))
            time.sleep(3600)
        elif i == 1 and label == "raise":
            raise ValueError("scripted failure in the unit")
        elif i == 1 and (label == "kill-always" or (label == "kill-once" and unit.attempt == 1)):
            os._exit(1)
        yield {**base, **cell_fields(cell), "status": "ok", "started_at": started, "ended_at": now(),
               "decode_ms_per_token": 1.0, "ttft_ms": 1.0}
