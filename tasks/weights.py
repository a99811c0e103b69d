"""Byte accounting of a loaded model's weights: the logical parameter count (quantized tensors counted unpacked),
the bytes of every parameter and buffer as stored (quantization state included), bits per parameter, and the bytes
of an input embedding a decode step does not read.

Generic rules here: every parameter and buffer, a tensor subclass (torchao, quanto) by the plain tensors it flattens
to, recursively, a tensor shared between modules once. A backend that stores a module's weight its own way says so
(`Loading.storage`: bitsandbytes' quant_state and SCB, HQQ's W_q and meta, gptqmodel's packed buffers)."""
from __future__ import annotations

import torch


def stored_tensors(t):
    """The plain tensors that hold a tensor's bytes: itself, or for a tensor subclass the tensors it flattens to."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        yield t
        return
    names, _ = flatten()
    for name in names:
        yield from stored_tensors(getattr(t, name))


def tensor_bytes(tensors) -> int:
    """Bytes of the given tensors as stored, each storage once."""
    seen: dict[int, int] = {}
    for t in tensors:
        for inner in stored_tensors(t):
            if inner.numel():
                seen.setdefault(inner.data_ptr(), inner.numel() * inner.element_size())
    return sum(seen.values())


def weight_stats(model, storage=None) -> dict:
    """`storage`: the backend's (module -> Stored or None) for modules it stores its own way."""
    claimed: dict[int, object] = {}          # id of a tensor a backend accounted for
    held, params = [], 0
    for module in model.modules():
        s = storage(module) if storage is not None else None
        if s is None:
            continue
        params += s.params
        for t in s.tensors:
            claimed[id(t)] = t
            held.append(t)
    for p in model.parameters():
        if id(p) not in claimed:
            params += p.numel()
            held.append(p)
    held += list(model.buffers())
    weights_bytes = tensor_bytes(held)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and inp.weight.data_ptr() == out.weight.data_ptr()
    return {
        "params": params,
        "weights_bytes": weights_bytes,
        "bits_per_param": 8.0 * weights_bytes / params if params else None,
        "embedding_unread_bytes": 0 if tied else tensor_bytes([inp.weight]),
    }
