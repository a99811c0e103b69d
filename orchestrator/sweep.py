"""One sweep from start to end: grid -> plan -> resume check -> Ray -> Parquet -> report."""
from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.grid import Grid, GridError, load_grid
from orchestrator.plan import Plan, Unit, make_plan, unsupported_before_start, unsupported_cells
from orchestrator.progress import Progress, summary_table
from orchestrator.store import Store
from orchestrator import wikitext


def output_dir(grid: Grid, output: str | None) -> Path:
    return Path(output or grid.output or Path("results") / grid.name)


def plan_for(grid: Grid) -> tuple[Plan, bytes | None]:
    raw, source = None, None
    if grid.perplexity:
        raw, source = wikitext.resolve(grid.perplexity.path, grid._base_dir)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    return make_plan(grid, run_id, source), raw


def pending_units(plan: Plan, statuses: dict[str, str], force: bool) -> list[Unit]:
    """Units holding only the cells still to do (all of them with force)."""
    out = []
    for u in plan.units:
        todo = [c for c in u.cells if force or statuses.get(c.key) != "ok"]
        if todo:
            out.append(Unit(u.unit_id, u.model, u.precision, todo, u.size))
    return out


def run(grid_path: str, overrides: list[str], address: str | None = None, output: str | None = None,
        force: bool = False, runner: str | None = None, live: bool | None = None,
        ray_init: dict | None = None) -> int:
    from cluster.connect import ClusterError, connect
    from orchestrator.driver import DEFAULT_RUNNER, failure_rows, run_units

    grid = load_grid(grid_path, overrides)
    out = output_dir(grid, output)
    try:
        cluster = connect(address, **(ray_init or {}))
    except ClusterError as e:
        raise GridError(str(e))
    if grid.resources.gpus_per_task > 0 and cluster.gpus == 0:
        print(f"note: {cluster.describe()} has no GPUs; units run on CPU (resources.gpus_per_task = 0)")
        grid.resources.gpus_per_task = 0
    gpus = grid.resources.gpus_per_task
    if gpus > max(cluster.gpus_per_node, default=0) and gpus > 0:
        raise GridError(f"resources.gpus_per_task: {gpus:g} GPUs per task, but the largest node has "
                        f"{max(cluster.gpus_per_node, default=0):g}")
    cpus = grid.resources.cpus_per_task
    if cpus is None:
        cpus = 1 if gpus > 0 else max(cluster.cpus_per_node, default=1)
    plan, raw = plan_for(grid)
    store = Store(out, plan.run_id)
    statuses = {} if force else store.statuses()
    retired = store.retire_except({c.key for c in plan.cells})
    units = pending_units(plan, statuses, force)
    device_type = "cuda" if gpus > 0 else "cpu"
    unsupported = unsupported_before_start(plan, device_type, cluster.accelerators)
    skipped_units = [u for u in units if u.unit_id in unsupported]
    units = [u for u in units if u.unit_id not in unsupported]
    bad_cells = unsupported_cells(plan, device_type)  # e.g. compiled decode where a backend cannot
    skipped_cells = [(u, c) for u in units for c in u.cells if c.key in bad_cells]
    units = [Unit(u.unit_id, u.model, u.precision, [c for c in u.cells if c.key not in bad_cells], u.size)
             for u in units]
    units = [u for u in units if u.cells]
    todo = sum(len(u.cells) for u in units)
    skipping = sum(len(u.cells) for u in skipped_units) + len(skipped_cells)
    print(f"sweep {grid.name}: {len(plan.cells)} cells in {len(plan.units)} units; {todo} to run "
          f"({len(plan.cells) - todo - skipping} already ok, {skipping} skipped{', forced' if force else ''}"
          f"{f', {retired} stale rows moved to history' if retired else ''}); {cluster.describe()}; "
          f"{gpus:g} GPU and {cpus:g} CPU per unit; output {out}")
    manifest = {"sweep": grid.name, "run_id": plan.run_id, "started_at": datetime.now(timezone.utc).isoformat(),
                "grid": grid.model_dump(), "grid_file": str(Path(grid_path).resolve()), "overrides": overrides,
                "cluster": vars(cluster), "cells": len(plan.cells), "cells_to_run": todo,
                "units": [{"unit_id": u.unit_id, "label": u.label, "cells": len(u.cells)} for u in units],
                "skipped_before_start": {u.label: unsupported[u.unit_id] for u in skipped_units}}
    store.write_manifest(manifest)
    for u in skipped_units:
        print(f"skip   {u.label}: {unsupported[u.unit_id]}")
    skipped_rows = []  # known before anything starts: rows at once, no task
    for u, cells, reason in ([(u, u.cells, unsupported[u.unit_id]) for u in skipped_units]
                             + [(u, [c], bad_cells[c.key]) for u, c in skipped_cells]):
        for row in failure_rows(u.to_task(plan, cells), cells, "skipped", "Unsupported", reason):
            store.write(row)
            skipped_rows.append(row)
    if skipped_cells:
        print(f"skip   {len(skipped_cells)} cell(s) whose axis values their backend cannot run (see their rows)")
    t0 = time.monotonic()
    interrupted = False
    with Progress(todo, live=live) as progress:
        try:
            result = run_units(plan, units, store.write, progress, gpus_per_task=gpus, cpus_per_task=cpus,
                               timeout_s=grid.resources.timeout_s, retries=grid.resources.retries, wikitext=raw,
                               runner=runner or DEFAULT_RUNNER)
        except KeyboardInterrupt:
            interrupted = True
            result = None
    manifest.update(ended_at=datetime.now(timezone.utc).isoformat(), wall_s=time.monotonic() - t0,
                    interrupted=interrupted)
    if result:
        result.rows[:0] = skipped_rows
        manifest.update(model_loads=result.attempts, retries=result.retries, per_unit_s=result.per_unit_s)
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
          f"{result.attempts} model loads for {len(units)} units; results {store.cells}"
          + (f"; report {report}" if report else ""))
    return 1 if failed else 0


def render_report(out: Path) -> Path | None:
    from reports.build import render

    try:
        return render([out], out / "report.html")
    except Exception as e:  # the results are safe on disk; say why the report is missing
        print(f"warning: the report could not be rendered ({type(e).__name__}: {e}); "
              f"retry with `python -m orchestrator report {out}`")
        return None
