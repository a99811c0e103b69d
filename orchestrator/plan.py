"""Planning: a grid becomes cells and units.

A cell is one point of the grid: model × precision × new_tokens × batch_size (× decode × KV cache). Its key is a
hash of everything that can change its numbers (model source, precision and options, generation and perplexity
settings, GPUs per task, engine, measurement version), values made canonical first, so a changed configuration gets
a new key and resume never mixes old and new numbers. A unit is one (model, precision) pair: one Ray task that loads
the model once, measures perplexity once and measures each of its cells. Units go out largest first, so the longest
work starts early and no straggler starts last.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import wikitext
from orchestrator.grid import Grid
from orchestrator.headers import fingerprint
from orchestrator.model_info import identify, model_config, model_shape, model_widths
from common.catalog import MEASUREMENT_VERSION, RANDOM_IDS, capability_of, kv_reason, measurement_version
from common.units import (Calibration, CellSpec, GenerationSpec, ModelSpec, PerplexitySpec, PrecisionSpec,
                        ReferenceSpec, UnitSpec)
from tasks.precisions import REGISTRY


@dataclass
class Unit:
    unit_id: str
    model: ModelSpec
    precision: PrecisionSpec
    cells: list[CellSpec]
    size: float                       # estimated work, for ordering
    attempt: int = 1
    reference: ReferenceSpec | None = None   # makes the model's baseline reference, or uses it (distances)
    quality_key: str | None = None    # perplexity and distance measured once per key (reused from earlier rows)
    known_quality: dict | None = None  # those columns, when the output folder has them already
    reference_only: bool = False      # no cells: only make the baseline's reference for the other units
    engine: str = "hf"                # what runs it (common.units.ENGINES)

    @property
    def label(self) -> str:
        """Model × precision, and for an engine other than transformers the engine and the settings its units are
        split by (decode path, KV cache) where they are not the defaults."""
        text = f"{self.model.label} × {self.precision.label}"
        if self.engine == "hf":
            return text
        first = self.cells[0] if self.cells else None
        settings = ([first.decode] if first and first.decode != "compiled" else []) \
            + ([f"KV {first.kv.label}"] if first and first.kv.name != "native" else [])
        return f"{text} × {self.engine}" + (f" ({', '.join(settings)})" if settings else "")

    def to_task(self, plan: "Plan", cells: list[CellSpec] | None = None) -> UnitSpec:
        """What the worker gets: these cells (all of the unit's by default), the settings, the calibration text."""
        precision = self.precision
        if precision.calibration and precision.calibration.sha256:
            precision = dataclasses.replace(precision, calibration=dataclasses.replace(
                precision.calibration, text=plan.texts.get(precision.calibration.sha256)))
        return UnitSpec(plan.name, plan.run_id, self.unit_id, self.model, precision,
                        list(cells if cells is not None else self.cells), plan.generation, plan.perplexity,
                        plan.gpus_per_task, plan.cpus_per_task, plan.baseline, self.attempt, self.engine,
                        self.reference, self.known_quality, self.reference_only, self.quality_key,
                        plan.usd_per_gpu_hour)


@dataclass
class Plan:
    name: str
    run_id: str
    units: list[Unit]
    generation: GenerationSpec
    perplexity: PerplexitySpec | None
    gpus_per_task: float
    baseline: str
    texts: dict[str, bytes] = field(default_factory=dict)  # calibration texts by sha256, shipped with their units
    cpus_per_task: float | None = None  # what each unit asks Ray for, recorded on its rows (not part of the keys)
    usd_per_gpu_hour: float | None = None  # the grid's cost (not part of the keys: it changes no measurement)

    @property
    def cells(self) -> list[CellSpec]:
        return [c for u in self.units for c in u.cells]


def unit_cost(model: ModelSpec, precision, options, cells: list[CellSpec], generation: GenerationSpec) -> float:
    """Relative work of a unit, for largest-first ordering. Eager decode of small models is bound by launching
    kernels layer by layer (per-layer cost, times the backend's extra kernels), large ones by reading weights."""
    params, layers = model_shape(model)
    step = layers * precision.launch_cost(options) + params * precision.bits(options) / 8 / 1e8
    runs = generation.warmup + (generation.repeats or min(generation.max_repeats, 10)) + 1
    cost = step * runs * sum(c.new_tokens + c.prompt_tokens / 64 for c in cells) + params / 1e6  # + loading
    if precision.calibrated:  # calibration (when not cached): its samples through the model, layer by layer; on an
        # H200, AWQ on SmolLM2 (128 x 512 tokens) took 280 s, about four of that model's decode units
        cost += params * options.calib_samples * options.calib_seqlen / 1e9 * 30
    return cost


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


def digest(identity, n: int) -> str:
    return hashlib.sha256(json.dumps(canonical(identity), sort_keys=True, default=str).encode()).hexdigest()[:n]


def cell_key(model: ModelSpec, precision: PrecisionSpec, cell: dict, grid: Grid, gpus_per_task: float,
             options: dict, engine: str = "hf") -> str:
    """`cell`: new_tokens, batch_size, decode and kv (a KvSpec). `options`: the precision's options as they identify
    a cell (the backend's `Options.key()`: an option added later is left out at its default)."""
    quantized_kv = grid.generation.quantized_kv  # kv-continuation perplexity is measured only then
    identity = {
        "model": model.identity(),
        "precision": {"name": precision.name, "options": options},
        "prompt_tokens": cell["prompt_tokens"], "new_tokens": cell["new_tokens"], "batch_size": cell["batch_size"],
        "decode": cell["decode"],
        "generation": grid.generation.model_dump(exclude={"prompt_tokens", "new_tokens", "batch_sizes", "decode",
                                                          "kv_cache"}),  # (the grid's cost and report: not here)
        "perplexity": grid.perplexity.model_dump(exclude={"path"} | (set() if quantized_kv else KV_PPL))
        if grid.perplexity else False,
        "gpus_per_task": gpus_per_task,
        "measurement_version": measurement_version(cell["decode"]),
    }
    kv = cell["kv"]
    if kv.name != "native":
        identity["kv_cache"] = {"name": kv.name, "options": kv.options}
    if engine != "hf":
        identity["engine"] = engine
    if precision.calibration:  # calibrated methods: the calibration data by content, not by path
        identity["precision"]["options"] = {k: v for k, v in options.items() if k != "calib_path"}
        identity["calibration"] = precision.calibration.sha256 or precision.calibration.name
    return digest(identity, 20)


def make_plan(grid: Grid, run_id: str, texts: wikitext.Texts | None = None,
              gpus_per_task: float | None = None) -> Plan:
    """The grid's cells and units. `texts`: the grid's texts as read before start (orchestrator.wikitext.read_texts;
    read now when None). `gpus_per_task`: what the units will ask for where they run (0 when the cluster has no
    GPU), the grid's own value by default; it is part of every key."""
    texts = texts if texts is not None else wikitext.read_texts(grid)
    base_dir = getattr(grid, "_base_dir", Path(os.getcwd()))
    gpus = grid.resources.gpus_per_task if gpus_per_task is None else gpus_per_task
    g = grid.generation
    generation = GenerationSpec(g.warmup, 0 if g.repeats == "auto" else g.repeats, g.profile,
                                g.max_repeats, g.max_seconds, g.target_halfwidth,
                                (g.throughput.requests, g.throughput.prompt_tokens, g.throughput.new_tokens)
                                if g.throughput else None)
    by_sha = {source["sha256"]: raw for raw, source in texts.calibration.values() if raw is not None}
    units = []
    for i, m in enumerate(grid.models):
        model = identify(m.spec(base_dir), f"models[{i}]")
        for engine in grid.engine:
            for j, p in enumerate(grid.precisions):
                units += _units(grid, g, model, engine, j, p, texts, generation, gpus)
    units.sort(key=lambda u: -u.size)
    _quality_and_references(grid, units, gpus, (texts.test_source or {}).get("sha256"))
    ppl = None
    if grid.perplexity:
        q = grid.perplexity
        source = texts.test_source or {}
        ppl = PerplexitySpec(q.protocol, q.seqlen, q.stride, q.max_windows, q.batch_size, source.get("dataset"),
                             source.get("sha256"), g.quantized_kv, q.kv_windows, q.kv_prefill, q.kv_continuation)
    return Plan(grid.name, run_id, units, generation, ppl, gpus, grid.baseline, by_sha,
                usd_per_gpu_hour=grid.cost.usd_per_gpu_hour if grid.cost else None)


def _units(grid: Grid, g, model: ModelSpec, engine: str, j: int, p, texts, generation: GenerationSpec,
           gpus: float) -> list[Unit]:
    """The units of one model at one precision on one engine: one for transformers (every cell, one load); for
    vLLM one per decode path and KV cache, which are settings of its engine (enforce_eager, kv_cache_dtype)."""
    backend = REGISTRY[p.name]
    parsed = backend.parse_options(p.options)
    calibration = None
    if backend.calibrated:
        source = {"name": RANDOM_IDS, "sha256": None} if model.synthetic else texts.calibration[j][1]
        calibration = Calibration(source["name"], source["sha256"])
    precision = PrecisionSpec(p.name, parsed.model_dump(), p.label, calibration, backend.description)
    key_options = parsed.key()
    folder = backend.loading.folder(parsed) if backend.loading.folder is not None else None
    if folder:  # a saved checkpoint changed in place is a new precision, as a model is
        key_options["fingerprint"] = fingerprint("path", folder, f"precisions[{j}].path")
    groups: dict[tuple, list[CellSpec]] = {}
    for kv in g.kv_cache:
        for d in g.decode:
            for pt in g.prompt_tokens:
                for n in g.new_tokens:
                    for b in g.batch_sizes:
                        axes = {"prompt_tokens": pt, "new_tokens": n, "batch_size": b, "decode": d, "kv": kv.spec()}
                        key = cell_key(model, precision, axes, grid, gpus, key_options, engine)
                        group = () if engine == "hf" else (d, kv.label)
                        groups.setdefault(group, []).append(CellSpec(key, **axes))
    out = []
    for group, cells in groups.items():
        size = unit_cost(model, backend, parsed, cells, generation)
        uid = digest([model.identity(), model.label, precision.name, precision.options, precision.label,
                      dataclasses.asdict(calibration) if calibration else None]
                     + ([engine, *group] if engine != "hf" else []), 12)
        out.append(Unit(uid, model, precision, cells, size, engine=engine))
    return out


def _quality_and_references(grid: Grid, units: list[Unit], gpus: float, dataset_sha256: str | None) -> None:
    """Each unit's quality key (perplexity settings and, for the others, the baseline they are compared with), and
    for a model whose baseline has other precisions beside it, who makes the baseline's reference and who uses it."""
    if not grid.perplexity:
        return
    settings = {"perplexity": grid.perplexity.model_dump(exclude={"path"} | KV_PPL),
                "dataset": dataset_sha256, "gpus_per_task": gpus, "measurement_version": MEASUREMENT_VERSION}
    by_model: dict[str, list[Unit]] = {}
    for u in units:
        by_model.setdefault(u.model.label, []).append(u)
    for model_units in by_model.values():
        identity = {u.unit_id: {"model": u.model.identity(), "precision": u.precision.name,
                                "options": {k: v for k, v in u.precision.options.items() if k != "calib_path"},
                                "calibration": u.precision.calibration and (u.precision.calibration.sha256
                                                                            or u.precision.calibration.name)}
                    | ({"unit": u.unit_id} if u.engine != "hf" else {}) for u in model_units}
        # the reference is the baseline as the grid's first engine runs it: every other unit, the baseline on other
        # engines included, is measured against it (that distance is the engines' own)
        base = next((u for u in model_units if u.precision.label == grid.baseline and u.engine == grid.engine[0]),
                    None)
        distance = base is not None and len(model_units) > 1 and not base.model.synthetic
        key = digest({**settings, "engine": base.engine, "baseline": identity[base.unit_id]}, 20) if distance \
            else None
        for u in model_units:
            against = None if u is base or not distance else key
            u.quality_key = digest({**settings, "engine": u.engine, "unit": identity[u.unit_id],
                                    "reference": against}, 20)
            if distance:
                u.reference = ReferenceSpec(key, "make" if u is base else "use", grid.baseline)
            elif u is base:
                u.reference = ReferenceSpec("", "self", grid.baseline)  # its own distance: 0 and 1 by definition


def engine_reason(engine: str, device_type: str) -> str | None:
    """Why an engine cannot run where the sweep runs, or None."""
    if engine == "vllm" and device_type != "cuda":
        return "vLLM runs on NVIDIA GPUs only (no vLLM wheel runs on a CPU-only machine); this sweep runs on CPU"
    return None


def unsupported_before_start(plan: Plan, device_type: str, accelerators: list[str]) -> dict[str, str]:
    """unit_id -> why its precision cannot run where the sweep will run it, known before anything starts: the device
    type (cuda or cpu), when every GPU node reports the same Ray accelerator type its compute capability, and the
    model's projection widths against the method's groups and kernels. The workers check again on the device."""
    caps = {capability_of(a) for a in accelerators}
    capability = caps.pop() if device_type == "cuda" and len(caps) == 1 else None
    out = {}
    for u in plan.units:
        p = REGISTRY[u.precision.name]
        opts = p.parse_options(u.precision.options)
        reason = engine_reason(u.engine, device_type) or p.engine_reason(u.engine, opts) \
            or (None if p.random_packed(u.engine, u.model.synthetic) else p.method.missing()) \
            or p.unsupported_reason(device_type, opts, None, capability) \
            or p.model_reason(opts, u.model.synthetic, model_config(u.model)) \
            or (p.kv_reason(u.engine, u.cells[0].kv.name, opts, capability) if u.cells else None)
        # projection widths against transformers' kernels (vLLM picks its own, and says so when it cannot)
        widths = model_widths(u.model) if p.limits.shape_reason and not reason and u.engine == "hf" else None
        if widths:
            reason = p.shape_reason(opts, widths, capability)
        if reason:
            out[u.unit_id] = reason + (f" ({accelerators[0]})" if capability and "capability" in reason else "")
    return out


def unsupported_cells(plan: Plan, device_type: str | None = None) -> dict[str, str]:
    """cell key -> why the cell cannot run, for cells whose axis values a backend does not support (decode: compiled
    with a backend that cannot be compiled, or with a quantized KV cache), known before anything starts."""
    out = {}
    for u in plan.units:
        precision = REGISTRY[u.precision.name]
        opts = precision.parse_options(u.precision.options)
        for c in u.cells:
            reason = ((precision.decode_reason(c.decode, device_type, opts, c.batch_size) if u.engine == "hf" else None)
                      or kv_reason(c.kv.name, c.decode, u.engine))
            if reason:
                out[c.key] = reason
    return out
