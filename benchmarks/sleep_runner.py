"""A measurement that only sleeps (label sleep-<seconds>-u<i>), for benchmarks/driver_overhead.py."""
import os
import socket
import time

from common.rows import cell_fields, now, unit_rows_base


def run_unit(unit, wikitext=None):
    seconds = float(unit.model.label.split("-")[1])
    base = {**unit_rows_base(unit), "host": socket.gethostname(), "worker_pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    for cell in unit.cells:
        started = now()
        time.sleep(seconds)
        yield {**base, **cell_fields(cell), "status": "ok", "started_at": started, "ended_at": now(),
               "decode_ms_per_token": 0.0, "ttft_ms": 0.0}
