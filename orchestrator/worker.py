"""The Ray task that runs one unit. Kept apart from the driver so that a worker process imports only this, not the
driver's planning code. It also moves the baseline's reference for distances between nodes: the unit that makes it
writes it to its node's cache, and this task puts the file into Ray's object store for the model's other units,
whose tasks write it to their node's cache if it is not there yet.

Ray workers are reused (`max_calls=0`): starting a Ray worker costs seconds, and so does importing torch. Each unit
still gets a fresh process: the task forks it from the worker's warm fork server (orchestrator.forkserver), hands it
this task's CUDA_VISIBLE_DEVICES, and streams its rows back. A child that dies becomes `UnitProcessDied`, which the driver
treats like a crashed worker (retried); a cancelled task kills its worker, whose fork server and child go with it.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import ray

from orchestrator import forkserver
from common.cache import reference_path


@ray.remote(max_retries=0, max_calls=0)
def unit_task(runner: str, unit, wikitext: bytes | None):
    """Generator task: first where it runs, then one row per finished cell (and the reference, if it makes one)."""
    if unit.reference and unit.reference.role == "use" and unit.reference.holder:
        unit.reference = _reference_here(unit.reference)
    t0 = time.perf_counter()
    proc, conn = forkserver.start(runner, unit, wikitext)
    parts = {"fork_s": time.perf_counter() - t0, "reference_put_s": 0.0}
    yield {"_event": "start", "host": socket.gethostname(), "pid": proc.pid, "worker_pid": os.getpid(),
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    last = time.perf_counter()
    for item in forkserver.rows(proc, conn):
        if item.get("_event") == "reference":  # nested in a list: the driver passes it on without fetching it
            t0 = time.perf_counter()
            item = {**item, "holder": [ray.put(Path(item["path"]).read_bytes())]}
            parts["reference_put_s"] += time.perf_counter() - t0
        yield item
        last = time.perf_counter()
    # where the unit's time outside loading and measuring goes (benchmarks/unit_overhead.py reads it from sweep.json)
    yield {"_event": "end", **parts, "exit_s": time.perf_counter() - last}


def _reference_here(ref):
    """The reference in this node's cache, fetched from the object store if it is not there yet."""
    path = reference_path(ref.key)
    if path.is_file():
        return ref
    try:
        data = ray.get(ref.holder[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return ref
    except Exception as e:  # lost with the worker that held it, or no room on this node
        first = (str(e).splitlines() or [""])[0][:200]
        return dataclasses.replace(ref, holder=None, missing=f"the baseline's reference could not be fetched "
                                                                f"({type(e).__name__}: {first})")
