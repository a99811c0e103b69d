"""Where a node keeps what it builds once: converted and synthetic model folders, calibrated checkpoints, tokenized
texts, baseline references. $QSWEEP_CACHE, else ~/.cache/quant-sweep. Driver and worker agree on these paths."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("QSWEEP_CACHE", Path.home() / ".cache" / "quant-sweep"))


def reference_path(key: str) -> Path:
    """A baseline's reference for distances (tasks.distance), by its key."""
    return cache_root() / "references" / f"{key}.pt"
