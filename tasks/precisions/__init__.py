"""The precision registry: one small module per backend.

Each backend is a `Precision`: a name, the devices it runs on, a pydantic model of its options, and `load_kwargs()`
giving the `from_pretrained` arguments that realise it. Metadata here imports neither torch nor bitsandbytes, so the
grid can be validated on a machine without them.
"""
from __future__ import annotations

from tasks.precisions.base import Precision
from tasks.precisions import bnb, full

REGISTRY: dict[str, Precision] = {p.name: p for p in (*full.PRECISIONS, *bnb.PRECISIONS)}


def get(name: str) -> Precision:
    return REGISTRY[name]
