"""The precision registry: one small module per backend.

Each backend is a `Precision`: a name, the devices it runs on, a pydantic model of its options, and `build()` giving
the `from_pretrained` arguments that realise it (plus `after_load` for libraries with their own API). Metadata here
imports neither torch nor any quantization library, so a grid can be validated on a machine without them.
"""
from __future__ import annotations

from tasks.precisions.base import Precision
from tasks.precisions import bnb, full, gptq_backend, hqq_backend, quanto_backend, torchao_backend

REGISTRY: dict[str, Precision] = {p.name: p for p in (*full.PRECISIONS, *bnb.PRECISIONS, *torchao_backend.PRECISIONS,
                                                      *quanto_backend.PRECISIONS, *hqq_backend.PRECISIONS,
                                                      *gptq_backend.PRECISIONS)}


def get(name: str) -> Precision:
    return REGISTRY[name]
