"""One sweep from start to end: grid -> checks -> lock -> Ray -> schedule -> Parquet -> report.

Everything the input allows is decided before Ray starts (the grid, its files and models, the output folder); a sweep
whose cells are all done says so and exits without starting Ray. Its run's manifest (`runs/<run_id>.json`) is written
when the lock is taken and updated as the run goes, so an interrupted run is recorded as one."""
from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.checks import check_inputs, output_dir
from orchestrator.grid import load_grid
from orchestrator.lock import OutputLock
from orchestrator.progress import Progress, summary_table
from orchestrator.schedule import new_run_id, resources_for, schedule
from orchestrator.signals import Interrupted, check, clear, finishing, install, interruptible
from orchestrator.store import Store, StoreError
from orchestrator.wikitext import read_texts
from common.untrusted import BadInput, plain


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def run(grid_path: str, overrides: list[str], address: str | None = None, output: str | None = None,
        force: bool = False, runner: str | None = None, live: bool | None = None,
        ray_init: dict | None = None, trust_remote_code: bool = False) -> int:
    with interruptible():
        grid = load_grid(grid_path, overrides)
        out = output_dir(grid, output)
        check_inputs(grid, out, trust_remote_code)  # before Ray starts: output writable, sources reachable and
        texts = read_texts(grid)                    # identified, lengths within context, every text file checked
        run_id = new_run_id()
        with OutputLock(out, run_id) as lock:
            note = lock.acquire()
            if note:
                print(f"note: {plain(note)}")
            try:
                store = Store(out, run_id)
            except StoreError as e:
                raise BadInput(f"output: {e}") from None
            # wall_s: from here (the lock taken) to the end, Ray's start included: the time the command reports
            t0 = time.monotonic()
            manifest = {"sweep": grid.name, "run_id": run_id, "started_at": _now(), "state": "starting",
                        "grid_file": str(Path(grid_path).resolve()), "overrides": overrides}
            try:
                store.write_manifest(manifest, latest=False)
                for line in store.set_aside():
                    print(f"note: set aside (not the row its name claims, moved to {out / 'set-aside' / run_id}): "
                          f"{plain(line)}")
                rc = _run(grid, out, store, manifest, texts, address, force, runner, live, ray_init, t0)
                check()  # a signal a finalizer swallowed on the way
                return rc
            except StoreError as e:
                print(f"error: {plain(str(e))}; the rows written before it are intact in {out / 'cells'}; run the "
                      f"same command again to resume once the folder can be written", file=sys.stderr)
                return 1
            except (Interrupted, SystemError) as caught:
                # a signal raised inside Ray's compiled code comes out as a SystemError whose context is it
                e = caught if isinstance(caught, Interrupted) else caught.__context__
                if not isinstance(e, Interrupted):
                    raise
                clear()
                manifest.update(state="interrupted", interrupted=True, signal=str(e), ended_at=_now(),
                                wall_s=time.monotonic() - t0)
                try:
                    store.write_manifest(manifest, latest="cell_keys" in manifest)
                except StoreError:
                    pass
                print(f"interrupted ({e}): finished cells are in {out / 'cells'}; run the same command again to "
                      f"resume", file=sys.stderr)
                return e.exit_code
            finally:
                with finishing():
                    store.close()
                    _shutdown_ray()


def _shutdown_ray() -> None:
    """Stop the embedded Ray this process started (a cluster given by address, or one a caller started, stays)."""
    from cluster.connect import shutdown_started_here

    shutdown_started_here()


def _embedded(address: str | None) -> bool:
    return address is None and not os.environ.get("RAY_ADDRESS")


def _nothing_to_do(grid, out: Path, texts, force: bool, ray_init: dict | None) -> int | None:
    """The number of cells when every one is already ok on this machine (known without starting Ray: for an
    embedded Ray, whose resources are this machine's), else None."""
    from cluster.connect import local_gpus

    gpus = (ray_init or {}).get("num_gpus")
    cpus = (ray_init or {}).get("num_cpus") or os.cpu_count() or 1
    resources = resources_for(grid, [float(local_gpus() if gpus is None else gpus)], [float(cpus)])
    sched = schedule(grid, out, resources, texts, force)
    if sched.to_run or sched.skipping:
        return None
    print(f"sweep {plain(grid.name)}: nothing to do: all {len(sched.plan.cells)} cells are already ok in {out} "
          f"(--force measures them again)")
    return len(sched.plan.cells)


def _run(grid, out: Path, store: Store, manifest: dict, texts, address, force, runner, live, ray_init,
         t0: float) -> int:
    from cluster.connect import ClusterError, connect
    from orchestrator.driver import DEFAULT_RUNNER, failure_rows, run_units

    done = _nothing_to_do(grid, out, texts, force, ray_init) if _embedded(address) else None
    if done is not None:  # its own manifest; sweep.json keeps describing the run that measured
        manifest.update(state="nothing to do", cells=done, cells_to_run=0, already_ok=done, ended_at=_now())
        store.write_manifest(manifest, latest=False)
        report = render_report(out)
        if report:
            print(f"report {report}")
        return 0
    try:
        cluster = connect(address, **(ray_init or {}))
    except ClusterError as e:
        raise BadInput(str(e))
    except SystemExit as e:  # ray.init's own SIGTERM handler (exit 15, or 1 from its node's), before ours is back
        if e.code in (1, 15):
            raise Interrupted(15) from None
        raise
    install()  # ray.init replaced our SIGTERM handler with its own (which exits 1)
    resources = resources_for(grid, cluster.gpus_per_node, cluster.cpus_per_node, cluster.accelerators)
    for note in resources.notes:
        print(f"note: {note}")
    sched = schedule(grid, out, resources, texts, force, store.run_id)
    plan = sched.plan
    print(f"sweep {plain(grid.name)}: {len(plan.cells)} cells in {len(plan.units)} units; {sched.to_run} to run "
          f"({sched.already_ok} already ok, {sched.skipping} skipped{', forced' if force else ''}); "
          f"{cluster.describe()}; "
          f"{resources.gpus_per_task:g} GPU and {resources.cpus_per_task:g} CPU per unit; output {out}")
    manifest.update(state="running", grid=grid.model_dump(),
                    resources={"gpus_per_task": resources.gpus_per_task, "cpus_per_task": resources.cpus_per_task},
                    cluster=vars(cluster), cells=len(plan.cells), cells_to_run=sched.to_run,
                    cell_keys=[c.key for c in plan.cells],
                    units=[{"unit_id": u.unit_id, "label": u.label, "cells": len(u.cells)} for u in sched.units],
                    skipped_before_start={u.label: reason for u, reason in sched.skipped_units})
    store.write_manifest(manifest)
    skipped_rows = []  # known before anything starts: rows at once, no task
    for u, reason in sched.skipped_units:
        print(f"skip   {plain(u.label)}: {plain(reason)}")
    for u, cells, reason in ([(u, u.cells, r) for u, r in sched.skipped_units]
                             + [(u, [c], r) for u, c, r in sched.skipped_cells]):
        for row in failure_rows(u.to_task(plan, cells), cells, "skipped", "Unsupported", reason):
            store.write(row)
            skipped_rows.append(row)
    if sched.skipped_cells:
        print(f"skip   {len(sched.skipped_cells)} cell(s) whose axis values their backend cannot run (see their rows)")
    with Progress(sched.to_run, live=live) as progress:
        result = run_units(plan, sched.units, store.write, progress, gpus_per_task=resources.gpus_per_task,
                           cpus_per_task=resources.cpus_per_task, timeout_s=grid.resources.timeout_s,
                           retries=grid.resources.retries, wikitext=sched.wikitext, runner=runner or DEFAULT_RUNNER)
    manifest.update(state="ended", ended_at=_now(), wall_s=time.monotonic() - t0, interrupted=False)
    result.rows[:0] = skipped_rows
    manifest.update(model_loads=result.attempts, retries=result.retries, per_unit_s=result.per_unit_s,
                    per_unit_parts=result.per_unit_parts)
    store.write_manifest(manifest)
    report = render_report(out)
    grid_order = {(m.default_label(), p.label): (i, j) for i, m in enumerate(grid.models)
                  for j, p in enumerate(grid.precisions)}
    progress.console.print(summary_table(sorted(result.rows, key=lambda r: grid_order.get(
        (r.get("model"), r.get("precision")), (len(grid_order), 0)))))
    failed = sum(r["status"] in ("error", "oom", "timeout") for r in result.rows)
    print(f"{len(result.rows) - failed} of {len(result.rows)} cells without failure in "
          f"{_duration(manifest['wall_s'])}; {result.attempts} model loads for {len(sched.units)} units; "
          f"results {store.cells}" + (f"; report {report}" if report else ""))
    return 1 if failed else 0


def _duration(seconds: float) -> str:
    """Seconds as people read them: 42.3 s, 6 m 59 s, 7 h 9 m 31 s."""
    s = round(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} m {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} m {s % 60:02d} s"


def render_report(out: Path) -> Path | None:
    from reports.build import render

    try:
        path, unreadable = render([out], out / "report.html")
        for bad in unreadable:
            print(f"warning: left out of the report: {plain(bad)}")
        return path
    except Exception as e:  # the results are safe on disk; say why the report is missing
        print(f"warning: the report could not be rendered ({type(e).__name__}: {plain(str(e))}); "
              f"retry with `python -m orchestrator report {out}`")
        return None
