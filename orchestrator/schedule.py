"""One schedule for `validate` and `sweep`: what the units ask for where they run, the plan, what is already done in
the output folder, and what cannot run there (skipped before anything starts, with the reason)."""
from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from orchestrator import wikitext
from common.untrusted import BadInput
from orchestrator.grid import Grid
from orchestrator.plan import Plan, Unit, make_plan, unsupported_before_start, unsupported_cells
from common.units import CellSpec
from orchestrator.store import cell_statuses, known_quality


@dataclass(frozen=True)
class Resources:
    """What each unit asks Ray for where the sweep runs, derived from the grid's `resources` and the cluster."""
    gpus_per_task: float
    cpus_per_task: float
    accelerators: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_task > 0 else "cpu"


def resources_for(grid: Grid, gpus_per_node: list[float], cpus_per_node: list[float],
                  accelerators: list[str] = ()) -> Resources:
    """The grid's resources on a cluster with these nodes; BadInput for what no node can ever give."""
    r = grid.resources
    gpus, notes = r.gpus_per_task, []
    most_gpus, most_cpus = max(gpus_per_node, default=0), max(cpus_per_node, default=0)
    if gpus > 0 and sum(gpus_per_node) == 0:
        notes.append("the cluster has no GPUs; units run on CPU (resources.gpus_per_task = 0)")
        gpus = 0.0
    if gpus > most_gpus:
        raise BadInput(f"resources.gpus_per_task: {gpus:g} GPUs per task, but the largest node has {most_gpus:g}")
    cpus = r.cpus_per_task
    if gpus == 0 and cpus == 0:
        raise BadInput("resources.cpus_per_task: 0 on CPU lets every unit run at once on the same cores, each timing "
                       "the others' work; give each unit cores (null: a whole node, one unit at a time)")
    if cpus is None:
        cpus = 1.0 if gpus > 0 else float(most_cpus or 1)
    if cpus > most_cpus:
        raise BadInput(f"resources.cpus_per_task: {cpus:g} CPUs per task, but the largest node has {most_cpus:g}; "
                       f"no unit could ever start")
    if gpus == 0 and cpus < most_cpus:
        notes.append(f"resources.cpus_per_task {cpus:g} of a node's {most_cpus:g}: units may run at once on shared "
                     f"cores, which slows the timings of each (rows record cpus_per_task and host_load_1m)")
    return Resources(gpus, cpus, tuple(accelerators), tuple(notes))


@dataclass
class Schedule:
    plan: Plan
    wikitext: bytes | None                       # the test split's bytes when read locally, shipped to the workers
    statuses: dict[str, str]                     # cell key -> status of the rows already in the output folder
    units: list[Unit]                            # to run: only their cells still to do and able to run here
    # known before start, with the reason: whole units (the precision cannot run here) and single cells (an axis
    # value the backend cannot run, e.g. compiled decode)
    skipped_units: list[tuple[Unit, str]] = field(default_factory=list)
    skipped_cells: list[tuple[Unit, CellSpec, str]] = field(default_factory=list)

    @property
    def to_run(self) -> int:
        return sum(len(u.cells) for u in self.units)

    @property
    def skipping(self) -> int:
        return sum(len(u.cells) for u, _ in self.skipped_units) + len(self.skipped_cells)

    @property
    def already_ok(self) -> int:
        return len(self.plan.cells) - self.to_run - self.skipping


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def pending_units(plan: Plan, statuses: dict[str, str], force: bool) -> list[Unit]:
    """Units holding only the cells still to do (all of them with force)."""
    out = []
    for u in plan.units:
        todo = [c for c in u.cells if force or statuses.get(c.key) != "ok"]
        if todo:
            out.append(dataclasses.replace(u, cells=todo))
    return out


def schedule(grid: Grid, out: Path, resources: Resources, texts: wikitext.Texts, force: bool = False,
             run_id: str | None = None) -> Schedule:
    plan = make_plan(grid, run_id or new_run_id(), texts, resources.gpus_per_task)
    plan.cpus_per_task = resources.cpus_per_task
    raw = texts.test
    statuses = cell_statuses(out)
    units = pending_units(plan, statuses, force)
    whole = unsupported_before_start(plan, resources.device, list(resources.accelerators))
    some = unsupported_cells(plan, resources.device)  # axis values a backend cannot run (compiled decode, KV cache)
    sched = Schedule(plan, raw, statuses, [])
    for u in units:
        if u.unit_id in whole:
            sched.skipped_units.append((u, whole[u.unit_id]))
            continue
        sched.skipped_cells += [(u, c, some[c.key]) for c in u.cells if c.key in some]
        keep = [c for c in u.cells if c.key not in some]
        if keep:
            sched.units.append(dataclasses.replace(u, cells=keep))
    _quality(sched, known_quality(out), whole)
    return sched


def _quality(sched: Schedule, known: dict[str, dict], whole: dict[str, str]) -> None:
    """Reuse perplexity and distance measured before (same quality key); a unit that still measures its distance needs
    the baseline's reference: made by the baseline's unit when it runs, else by a reference-only unit of it; where
    the baseline cannot run here, the distance is missing with the reason."""
    for u in sched.units:
        role = u.reference.role if u.reference else None
        if u.quality_key in known and role != "make":
            u.known_quality = known[u.quality_key]
            if role == "use":
                u.reference = None
    needed = {u.reference.key for u in sched.units if u.reference and u.reference.role == "use"}
    made = {u.reference.key for u in sched.units if u.reference and u.reference.role == "make"}
    for u in sched.units:  # a baseline running with no other unit to use its reference: its own distance only
        if u.reference and u.reference.role == "make" and u.reference.key not in needed:
            u.reference = dataclasses.replace(u.reference, role="self")
    bases = {u.reference.key: u for u in sched.plan.units if u.reference and u.reference.role == "make"}
    for key in needed - made:
        base = bases[key]
        if base.unit_id in whole:
            for u in sched.units:
                if u.reference and u.reference.key == key:
                    u.reference = dataclasses.replace(u.reference, missing=f"the baseline {base.precision.label} "
                                                                         f"cannot run here: {whole[base.unit_id]}")
        else:
            sched.units.insert(0, dataclasses.replace(base, cells=[], reference_only=True))
