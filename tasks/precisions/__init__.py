"""The precision registry: one module (or package) per backend, each owning its whole story: what it is, how it
loads and how its stored bytes are counted, where it cannot run (tasks/precisions/base.py). Importing the registry
imports neither torch nor any quantization library, so the driver validates grids on a machine without them.
"""
from __future__ import annotations

from tasks.precisions.base import Precision
from tasks.precisions import bnb, full, gptq, hqq_backend, quanto_backend, saved, torchao_backend

REGISTRY: dict[str, Precision] = {p.name: p for p in (*full.PRECISIONS, *bnb.PRECISIONS, *torchao_backend.PRECISIONS,
                                                      *quanto_backend.PRECISIONS, *hqq_backend.PRECISIONS,
                                                      *gptq.PRECISIONS, *saved.PRECISIONS)}


def get(name: str) -> Precision:
    return REGISTRY[name]


def library_imports() -> tuple[str, ...]:
    """Every module the backends import to load a model (quantization libraries, which may touch CUDA at import)."""
    return tuple(sorted({m for p in REGISTRY.values() for m in p.method.imports}))
