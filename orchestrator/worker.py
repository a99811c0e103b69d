"""The Ray task that runs one unit. Kept apart from the driver so that a worker process imports only this, not the
driver's planning code.

Ray workers are reused (`max_calls=0`): starting a Ray worker costs seconds, and so does importing torch. Each unit
still gets a fresh process: the task forks it from the worker's warm fork server (orchestrator.forkserver), hands it
this task's CUDA_VISIBLE_DEVICES, and streams its rows back. A child that dies becomes `UnitProcessDied`, which the driver
treats like a crashed worker (retried); a cancelled task kills its worker, whose fork server and child go with it.
"""
from __future__ import annotations

import os
import socket

import ray

from orchestrator import forkserver


@ray.remote(max_retries=0, max_calls=0)
def unit_task(runner: str, unit, wikitext: bytes | None):
    """Generator task: first where it runs, then one row per finished cell."""
    proc, conn = forkserver.start(runner, unit, wikitext)
    yield {"_event": "start", "host": socket.gethostname(), "pid": proc.pid, "worker_pid": os.getpid(),
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    yield from forkserver.rows(proc, conn)
