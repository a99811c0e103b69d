"""One sweep from start to end: grid -> checks -> lock -> Ray -> schedule -> Parquet -> report."""
from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.checks import check_inputs, output_dir
from orchestrator.files import BadInput
from orchestrator.grid import load_grid
from orchestrator.lock import OutputLock
from orchestrator.progress import Progress, summary_table
from orchestrator.schedule import new_run_id, resources_for, schedule
from orchestrator.store import Store, StoreError
from orchestrator.wikitext import read_texts


def run(grid_path: str, overrides: list[str], address: str | None = None, output: str | None = None,
        force: bool = False, runner: str | None = None, live: bool | None = None,
        ray_init: dict | None = None) -> int:
    grid = load_grid(grid_path, overrides)
    out = output_dir(grid, output)
    check_inputs(grid, out)  # before Ray starts: output writable, sources reachable, lengths within context,
    texts = read_texts(grid)  # and every text file read and checked
    run_id = new_run_id()
    with OutputLock(out, run_id) as lock:
        note = lock.acquire()
        if note:
            print(f"note: {note}")
        try:
            return _run(grid, grid_path, overrides, out, run_id, texts, address, force, runner, live, ray_init)
        except StoreError as e:
            print(f"error: {e}; the rows written before it are intact in {out / 'cells'}; run the same command "
                  f"again to resume once the folder can be written", file=sys.stderr)
            return 1


def _run(grid, grid_path, overrides, out: Path, run_id: str, texts, address, force, runner, live, ray_init) -> int:
    from cluster.connect import ClusterError, connect
    from orchestrator.driver import DEFAULT_RUNNER, failure_rows, run_units

    try:
        cluster = connect(address, **(ray_init or {}))
    except ClusterError as e:
        raise BadInput(str(e))
    resources = resources_for(grid, cluster.gpus_per_node, cluster.cpus_per_node, cluster.accelerators)
    for note in resources.notes:
        print(f"note: {note}")
    sched = schedule(grid, out, resources, texts, force, run_id)
    plan = sched.plan
    store = Store(out, plan.run_id)
    print(f"sweep {grid.name}: {len(plan.cells)} cells in {len(plan.units)} units; {sched.to_run} to run "
          f"({sched.already_ok} already ok, {sched.skipping} skipped{', forced' if force else ''}); "
          f"{cluster.describe()}; "
          f"{resources.gpus_per_task:g} GPU and {resources.cpus_per_task:g} CPU per unit; output {out}")
    manifest = {"sweep": grid.name, "run_id": plan.run_id, "started_at": datetime.now(timezone.utc).isoformat(),
                "grid": grid.model_dump(), "grid_file": str(Path(grid_path).resolve()), "overrides": overrides,
                "resources": {"gpus_per_task": resources.gpus_per_task, "cpus_per_task": resources.cpus_per_task},
                "cluster": vars(cluster), "cells": len(plan.cells), "cells_to_run": sched.to_run,
                "cell_keys": [c.key for c in plan.cells],
                "units": [{"unit_id": u.unit_id, "label": u.label, "cells": len(u.cells)} for u in sched.units],
                "skipped_before_start": {u.label: reason for u, reason in sched.skipped_units}}
    store.write_manifest(manifest)
    skipped_rows = []  # known before anything starts: rows at once, no task
    for u, reason in sched.skipped_units:
        print(f"skip   {u.label}: {reason}")
    for u, cells, reason in ([(u, u.cells, r) for u, r in sched.skipped_units]
                             + [(u, [c], r) for u, c, r in sched.skipped_cells]):
        for row in failure_rows(u.to_task(plan, cells), cells, "skipped", "Unsupported", reason):
            store.write(row)
            skipped_rows.append(row)
    if sched.skipped_cells:
        print(f"skip   {len(sched.skipped_cells)} cell(s) whose axis values their backend cannot run (see their rows)")
    t0 = time.monotonic()
    interrupted, result = False, None
    with Progress(sched.to_run, live=live) as progress:
        try:
            result = run_units(plan, sched.units, store.write, progress, gpus_per_task=resources.gpus_per_task,
                               cpus_per_task=resources.cpus_per_task, timeout_s=grid.resources.timeout_s,
                               retries=grid.resources.retries, wikitext=sched.wikitext,
                               runner=runner or DEFAULT_RUNNER)
        except KeyboardInterrupt:
            interrupted = True
    manifest.update(ended_at=datetime.now(timezone.utc).isoformat(), wall_s=time.monotonic() - t0,
                    interrupted=interrupted)
    if result:
        result.rows[:0] = skipped_rows
        manifest.update(model_loads=result.attempts, retries=result.retries, per_unit_s=result.per_unit_s,
                        per_unit_parts=result.per_unit_parts)
    store.write_manifest(manifest)
    if interrupted:
        print(f"interrupted: finished cells are in {store.cells}; run the same command again to resume")
        return 130
    report = render_report(out)
    grid_order = {(m.default_label(), p.label): (i, j) for i, m in enumerate(grid.models)
                  for j, p in enumerate(grid.precisions)}
    progress.console.print(summary_table(sorted(result.rows, key=lambda r: grid_order.get(
        (r.get("model"), r.get("precision")), (len(grid_order), 0)))))
    failed = sum(r["status"] in ("error", "oom", "timeout") for r in result.rows)
    print(f"{len(result.rows) - failed} of {len(result.rows)} cells without failure in {manifest['wall_s']:.1f} s; "
          f"{result.attempts} model loads for {len(sched.units)} units; results {store.cells}"
          + (f"; report {report}" if report else ""))
    return 1 if failed else 0


def render_report(out: Path) -> Path | None:
    from reports.build import render

    try:
        path, unreadable = render([out], out / "report.html")
        for bad in unreadable:
            print(f"warning: left out of the report, unreadable: {bad}")
        return path
    except Exception as e:  # the results are safe on disk; say why the report is missing
        print(f"warning: the report could not be rendered ({type(e).__name__}: {e}); "
              f"retry with `python -m orchestrator report {out}`")
        return None
