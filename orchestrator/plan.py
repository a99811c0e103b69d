"""Planning: a grid becomes cells and units.

A cell is one point of the grid: model × precision × new_tokens × batch_size. Its key is a hash of everything that
can change its numbers (model source, precision and options, generation and perplexity settings, GPUs per task,
measurement version), so a changed configuration gets a new key and resume never mixes old and new numbers.
A unit is one (model, precision) pair: one Ray task that loads the model once, measures perplexity once and measures
each of its cells. Units go out largest first, so the longest work starts early and no straggler starts last.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.grid import Grid
from orchestrator.model_info import model_shape, model_widths
from tasks.rows import MEASUREMENT_VERSION


@dataclass
class Cell:
    key: str
    model: str
    precision: str
    new_tokens: int
    batch_size: int
    decode: str = "eager"
    kv: dict = field(default_factory=lambda: {"name": "native", "options": {}, "label": "native"})

    @property
    def kv_cache(self) -> str:
        return self.kv["label"]

    def to_task(self) -> dict:
        return {"cell_key": self.key, "new_tokens": self.new_tokens, "batch_size": self.batch_size,
                "decode": self.decode, "kv_cache": self.kv}


@dataclass
class Unit:
    unit_id: str
    model: dict
    precision: dict
    cells: list[Cell]
    size: float                       # estimated work, for ordering
    attempt: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.model['label']} × {self.precision['label']}"

    def to_task(self, plan: "Plan", cells: list[Cell] | None = None) -> dict:
        return {
            "sweep": plan.name, "run_id": plan.run_id, "unit_id": self.unit_id, "attempt": self.attempt,
            "model": self.model, "precision": self.precision,
            "cells": [c.to_task() for c in (cells if cells is not None else self.cells)],
            "generation": plan.generation, "perplexity": plan.perplexity, "gpus": plan.gpus_per_task,
            "cpus": plan.cpus_per_task,
            "baseline": plan.baseline,
            **({"calibration": {**self.precision["calibration"],
                                "text": plan.texts.get(self.precision["calibration"]["sha256"])}}
               if self.precision.get("calibration") else {}),
        }


@dataclass
class Plan:
    name: str
    run_id: str
    units: list[Unit]
    generation: dict
    perplexity: dict | None
    gpus_per_task: float
    baseline: str
    texts: dict[str, bytes] = field(default_factory=dict)  # calibration texts by sha256, shipped with their units
    cpus_per_task: float | None = None  # what each unit asks Ray for, recorded on its rows (not part of the keys)

    @property
    def cells(self) -> list[Cell]:
        return [c for u in self.units for c in u.cells]


def unit_cost(model: dict, precision, options, cells: list[Cell], generation: dict) -> float:
    """Relative work of a unit, for largest-first ordering. Eager decode of small models is bound by launching
    kernels layer by layer (per-layer cost, times the backend's extra kernels), large ones by reading weights."""
    params, layers = model_shape(model)
    step = layers * precision.launch_cost(options) + params * precision.bits(options) / 8 / 1e8
    runs = generation["warmup"] + generation["repeats"] + 1
    return step * runs * sum(c.new_tokens for c in cells) + params / 1e6  # + loading


KV_PPL = {"kv_windows", "kv_prefill", "kv_continuation"}


def canonical(v):
    """A value as it is hashed into a key: integral floats as ints (1.0 and 1 are one setting), mappings with sorted
    string keys, tuples as lists."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {str(k): canonical(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [canonical(x) for x in v]
    return v


def cell_key(model: dict, precision: dict, new_tokens: int, batch_size: int, grid: Grid, decode: str = "eager",
             kv: dict | None = None, gpus_per_task: float | None = None) -> str:
    quantized_kv = grid.generation.quantized_kv  # kv-continuation perplexity is measured only then
    identity = {
        "model": {k: v for k, v in model.items() if k != "label"},
        "precision": {"name": precision["name"], "options": precision["options"]},
        "new_tokens": new_tokens, "batch_size": batch_size, "decode": decode,
        "generation": grid.generation.model_dump(exclude={"new_tokens", "batch_sizes", "decode", "kv_cache"}),
        "perplexity": grid.perplexity.model_dump(exclude={"path"} | (set() if quantized_kv else KV_PPL))
        if grid.perplexity else False,
        "gpus_per_task": grid.resources.gpus_per_task if gpus_per_task is None else gpus_per_task,
        "measurement_version": MEASUREMENT_VERSION,
    }
    if kv and kv["name"] != "native":  # (native cells keep the keys they had before the kv_cache axis existed)
        identity["kv_cache"] = {"name": kv["name"], "options": kv["options"]}
    if precision.get("calibration"):  # calibrated methods: the calibration data by content, not by path
        identity["precision"]["options"] = {k: v for k, v in precision["options"].items() if k != "calib_path"}
        identity["calibration"] = precision["calibration"]["sha256"] or precision["calibration"]["name"]
    return hashlib.sha256(json.dumps(canonical(identity), sort_keys=True, default=str).encode()).hexdigest()[:20]


def make_plan(grid: Grid, run_id: str, texts=None, gpus_per_task: float | None = None) -> Plan:
    """The grid's cells and units. `texts`: the grid's texts as read before start (orchestrator.wikitext.read_texts;
    read now when None). `gpus_per_task`: what the units will ask for where they run (0 when the cluster has no
    GPU), the grid's own value by default; it is part of every key."""
    from tasks.precisions import REGISTRY

    from orchestrator import wikitext
    from tasks.calibration import RANDOM_IDS

    texts = texts if texts is not None else wikitext.read_texts(grid)
    base_dir = getattr(grid, "_base_dir", Path(os.getcwd()))
    gpus = grid.resources.gpus_per_task if gpus_per_task is None else gpus_per_task
    units = []
    calibrations = {j: source for j, (_, source) in texts.calibration.items()}
    by_sha = {source["sha256"]: raw for raw, source in texts.calibration.values() if raw is not None}
    for m in grid.models:
        model = m.spec(base_dir)
        for j, p in enumerate(grid.precisions):
            parsed = REGISTRY[p.name].parse_options(p.options)
            opts = parsed.model_dump()
            precision = {"name": p.name, "options": opts, "label": p.label}
            if REGISTRY[p.name].calibrated:
                precision["calibration"] = ({"name": RANDOM_IDS, "sha256": None} if m.synthetic
                                            else calibrations[j])
            cells = [Cell(cell_key(model, precision, n, b, grid, d, kv.spec(), gpus), model["label"], p.label, n, b,
                          d, kv.spec())
                     for kv in grid.generation.kv_cache for d in grid.generation.decode
                     for n in grid.generation.new_tokens for b in grid.generation.batch_sizes]
            size = unit_cost(model, REGISTRY[p.name], parsed, cells, grid.generation.model_dump())
            uid = hashlib.sha256(json.dumps([model, precision], sort_keys=True).encode()).hexdigest()[:12]
            units.append(Unit(uid, model, precision, cells, size))
    units.sort(key=lambda u: -u.size)
    ppl = None
    if grid.perplexity:
        ppl = grid.perplexity.model_dump()
        ppl.update(texts.test_source or {})
        ppl["kv"] = grid.generation.quantized_kv  # kv-continuation perplexity per kv_cache entry
    return Plan(grid.name, run_id, units, grid.generation.model_dump(), ppl, gpus, grid.baseline, by_sha)


def unsupported_before_start(plan: Plan, device_type: str, accelerators: list[str]) -> dict[str, str]:
    """unit_id -> why its precision cannot run where the sweep will run it, known before anything starts: the device
    type (cuda or cpu), when every GPU node reports the same Ray accelerator type its compute capability, and the
    model's projection widths against the method's groups and kernels. The workers check again on the device."""
    from tasks.hardware import capability_of
    from tasks.precisions import REGISTRY

    caps = {capability_of(a) for a in accelerators}
    capability = caps.pop() if device_type == "cuda" and len(caps) == 1 else None
    out = {}
    for u in plan.units:
        p = REGISTRY[u.precision["name"]]
        opts = p.parse_options(u.precision["options"])
        reason = p.unsupported_reason(device_type, opts, None, capability)
        widths = model_widths(u.model) if p.shape_reason and not reason else None
        if widths:
            reason = p.shape_reason(opts, widths, capability)
        if reason:
            out[u.unit_id] = reason + (f" ({accelerators[0]})" if capability and "capability" in reason else "")
    return out


def unsupported_cells(plan: Plan, device_type: str | None = None) -> dict[str, str]:
    """cell key -> why the cell cannot run, for cells whose axis values a backend does not support (decode: compiled
    with a backend that cannot be compiled, or with a quantized KV cache), known before anything starts."""
    from tasks import kv_cache
    from tasks.precisions import REGISTRY

    out = {}
    for u in plan.units:
        precision = REGISTRY[u.precision["name"]]
        opts = precision.parse_options(u.precision["options"])
        for c in u.cells:
            reason = (precision.decode_reason(c.decode, device_type, opts, c.batch_size)
                      or kv_cache.decode_reason(c.kv, c.decode))
            if reason:
                out[c.key] = reason
    return out
