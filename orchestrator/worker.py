"""The Ray task that runs one unit. Kept apart from the driver so that a worker process imports only this (and the
runner), not the driver's planning code: a fresh worker per unit starts faster."""
from __future__ import annotations

import importlib
import os
import socket

import ray


@ray.remote(max_retries=0, max_calls=1)
def unit_task(runner: str, unit: dict, wikitext: bytes | None):
    """Generator task: first where it runs, then one row per finished cell."""
    yield {"_event": "start", "host": socket.gethostname(), "pid": os.getpid(),
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    module, _, fn = runner.partition(":")
    yield from getattr(importlib.import_module(module), fn)(unit, wikitext)
