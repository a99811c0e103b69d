"""The Ray driver: one GPU-pinned generator task per unit, rows streamed back cell by cell.

- Each unit is a Ray task asking for `gpus_per_task` GPUs, so Ray sets CUDA_VISIBLE_DEVICES to its own GPU(s).
- A fresh process per unit (clean CUDA context and peak counters; a broken context cannot poison the next unit): the
  Ray worker is reused, the unit runs in a child forked from its warm fork server (orchestrator.worker).
- The task is a generator: its first item says where it started, then one row per finished cell, so a crash mid-unit
  keeps what finished.
- A worker crash (killed process or unit process, lost node, Ray's out-of-memory killer) is retried `retries` times with the cells
  that had not finished; exhausted, they become failure rows. A Python exception that escapes the measurement becomes
  failure rows at once. A unit running past `timeout_s` is cancelled and its unfinished cells recorded as timeout.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass, field

import ray

from orchestrator import signals
from orchestrator.forkserver import UnitProcessDied
from orchestrator.plan import Plan, Unit
from orchestrator.worker import unit_task
from common.rows import failure_rows
from common.units import CellSpec, UnitSpec

CRASHES = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.LocalRayletDiedError,
           ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError, ray.exceptions.RaySystemError)
DEFAULT_RUNNER = "tasks.unit:run_unit_alone"


@dataclass
class Running:
    unit: Unit
    task: UnitSpec
    remaining: dict[str, CellSpec]
    started: float | None = None
    started_wall: float | None = None  # time.time() at the start: sweep.json's per_unit_parts, against the rows' clocks
    where: str = "queued"

    @property
    def attempt_key(self) -> str:
        """This attempt of the unit, as sweep.json's per-unit figures name it."""
        return f"{self.unit.unit_id}#{self.unit.attempt}"


@dataclass
class DriverResult:
    rows: list[dict] = field(default_factory=list)
    attempts: int = 0          # unit tasks started (first tries and retries)
    retries: int = 0
    per_unit_s: dict = field(default_factory=dict)
    per_unit_parts: dict = field(default_factory=dict)  # the worker's fork, reference hand-over and process exit (s)


def run_units(plan: Plan, units: list[Unit], sink, progress, *, gpus_per_task: float, cpus_per_task: float,
              timeout_s: float, retries: int, wikitext: bytes | None = None, runner: str = DEFAULT_RUNNER,
              poll_s: float = 0.2) -> DriverResult:
    """Run `units` (each holding only the cells still to do) and hand every row to `sink(row)` as it arrives."""
    result = DriverResult()
    wikitext_ref = None
    options = dict(num_gpus=gpus_per_task, num_cpus=cpus_per_task)
    active: dict = {}
    # units that measure their distance to the baseline wait for the baseline's reference (by key) when the baseline
    # runs in this sweep: started once it arrives, or without it (the distance missing, with why) if it never does
    made_here = {u.reference.key for u in units if u.reference and u.reference.role == "make"}
    waiting: dict[str, list[Unit]] = {}

    def submit(unit: Unit, cells: list[CellSpec]) -> None:
        task = unit.to_task(plan, cells)
        gen = unit_task.options(**options).remote(runner, task, wikitext_ref)
        active[gen] = Running(unit, task, {c.key: c for c in cells})

    def release(key: str, holder: list | None = None, missing: str | None = None) -> None:
        for unit in waiting.pop(key, []):
            unit.reference = dataclasses.replace(unit.reference, holder=holder, missing=missing)
            submit(unit, unit.cells)

    def unreleased() -> None:
        """References no running unit can make any more: their waiting units start without them."""
        making = {s.unit.reference.key for s in active.values() if s.unit.reference
                  and s.unit.reference.role == "make"}
        for key in [k for k in waiting if k not in making]:
            progress.log(f"note   the baseline's reference for {waiting[key][0].model.label} was not made; its other "
                         f"units measure everything but the distance")
            release(key, missing="the baseline's unit ended without making its reference (see its rows)")

    def emit(row: dict) -> None:
        sink(row)
        result.rows.append(row)
        progress.cell(row)

    def close(gen, state: Running) -> None:
        active.pop(gen, None)
        progress.unit_ended(state.unit.label)
        if state.started is not None:
            result.per_unit_s[state.attempt_key] = time.monotonic() - state.started
            result.per_unit_parts.setdefault(state.attempt_key, {}).update(
                driver_started_at=state.started_wall, driver_ended_at=time.time())

    def crashed(state: Running, e: BaseException) -> None:
        unit = state.unit
        if unit.attempt <= retries and state.remaining:
            result.retries += 1
            unit.attempt += 1
            progress.log(f"retry  {unit.label}: worker crashed ({type(e).__name__}); attempt "
                         f"{unit.attempt} of {retries + 1} with {len(state.remaining)} cell(s) left")
            submit(unit, list(state.remaining.values()))
        else:
            for row in failure_rows(state.task, state.remaining.values(), "error", type(e).__name__,
                                    f"worker crashed on attempt {unit.attempt} of {retries + 1}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}"):
                emit(row)

    def collect() -> None:
        """Collect rows until no unit is left: starts, rows, ends, crashes (retried), errors and timeouts."""
        while active or waiting:
            signals.check()
            unreleased()
            ready, _ = ray.wait(list(active), num_returns=1, timeout=poll_s) if active else ([], [])
            for gen in ready:
                state = active.get(gen)
                if state is None:
                    continue
                try:
                    item = ray.get(next(gen))
                except StopIteration:
                    close(gen, state)
                    if state.remaining:
                        for row in failure_rows(state.task, state.remaining.values(), "error", "MissingRows",
                                                "the unit ended without a row for this cell"):
                            emit(row)
                    continue
                except ray.exceptions.TaskCancelledError:
                    close(gen, state)
                    continue
                except (CRASHES + (ray.exceptions.RayTaskError,)) as e:
                    close(gen, state)
                    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None else e
                    if isinstance(cause, CRASHES + (UnitProcessDied,)):
                        crashed(state, cause)
                    else:
                        tb = getattr(cause, "child_traceback", None) or "".join(traceback.format_exception(cause))
                        for row in failure_rows(state.task, state.remaining.values(), "error", type(cause).__name__,
                                                str(cause)[:2000], tb[-8000:]):
                            emit(row)
                    continue
                if item.get("_event") == "start":
                    state.started, state.started_wall = time.monotonic(), time.time()
                    result.attempts += 1
                    gpu = item.get("cuda_visible_devices")
                    state.where = f"{item['host']} GPU {gpu}" if gpu not in (None, "") else f"{item['host']} CPU"
                    progress.unit_started(state.unit.label, state.where)
                    continue
                if item.get("_event") == "end":
                    result.per_unit_parts.setdefault(state.attempt_key, {}).update(
                        {k: v for k, v in item.items() if k != "_event"})
                    continue
                if item.get("_event") == "reference":  # the baseline's: its model's other units start now
                    release(item["key"], holder=item["holder"])
                    continue
                state.remaining.pop(item["cell_key"], None)
                emit(item)
            # timeouts: measured from the moment the worker started the unit, not from submission
            t = time.monotonic()
            for gen, state in list(active.items()):
                if state.started is not None and t - state.started > timeout_s:
                    close(gen, state)
                    ray.cancel(gen, force=True)
                    for row in failure_rows(state.task, state.remaining.values(), "timeout", "Timeout",
                                            f"unit ran past resources.timeout_s = {timeout_s:g} s and was cancelled"):
                        emit(row)

    try:
        with signals.deferred():  # a signal is raised at the loop's next turn, not inside Ray's compiled calls
            if wikitext is not None:
                wikitext_ref = ray.put(wikitext)
            for unit in units:
                ref = unit.reference
                if ref and ref.role == "use" and ref.key in made_here and not ref.missing:
                    waiting.setdefault(ref.key, []).append(unit)
                else:
                    submit(unit, unit.cells)
            collect()
    finally:  # stopped early (a signal, a results folder that cannot be written): no unit goes on measuring unseen
        for gen in list(active):
            ray.cancel(gen, force=True)
    return result

