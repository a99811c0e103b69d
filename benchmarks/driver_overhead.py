"""Driver overhead on a grid of at least 200 cells whose measurement is a fixed sleep, on a local Ray with 4 fake GPUs.

  python benchmarks/driver_overhead.py [--units 24] [--cells-per-unit 10] [--sleep 0.5]

Reports, from the rows' own timestamps:
- per_cell_overhead_ms (goal <= 20 ms): per GPU, the span from its first cell's start to its last cell's end minus the
  time asleep, divided by its cells: everything the engine adds per cell once running (streaming a row back, writing
  its Parquet file, forking the next unit's process, handing the GPU to the next task);
- start_up_s: the one-time cost before the first cells run and after the last (Ray starting a worker per GPU, each
  worker's fork server importing the runner), i.e. sweep wall time minus the longest per-GPU span;
- wall_over_ideal (goal <= 1.10): sweep wall time over cells x sleep / GPUs, start-up included; and the same overhead
  spread over the cells (amortized_overhead_ms_per_cell = (wall - ideal) x GPUs / cells);
- row_lag_ms: a cell's end in the worker to its file on disk at the driver;
- unit_to_unit_gap_ms: on one GPU, a unit's last cell end to the next unit's first cell start.
Not a test: numbers go in notes (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=24)
    ap.add_argument("--cells-per-unit", type=int, default=10)
    ap.add_argument("--sleep", type=float, default=0.5)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--output-json", dest="json", help="also write the result to this file")
    args = ap.parse_args()

    from cluster.connect import init_embedded
    from orchestrator import sweep

    work = Path(tempfile.mkdtemp(prefix="bench-driver-"))
    lengths = list(range(1, args.cells_per_unit + 1))
    models = "\n".join(f"  - synthetic: {{family: opt, hidden_size: 8, layers: 1, heads: 1, ffn: 8, vocab: {100 + i}}}"
                       f"\n    label: sleep-{args.sleep}-u{i}" for i in range(args.units))
    (work / "grid.yaml").write_text(f"""name: bench-driver
models:
{models}
precisions: [fp16]
generation: {{new_tokens: {lengths}, batch_sizes: [1]}}
perplexity: false
resources: {{gpus_per_task: 1, cpus_per_task: 0.25, timeout_s: 600, retries: 0}}
""")
    init_embedded(num_cpus=os.cpu_count(), num_gpus=args.gpus, log_to_driver=False)
    t0 = time.monotonic()
    code = sweep.run(str(work / "grid.yaml"), [], output=str(work / "out"), runner="benchmarks.sleep_runner:run_unit",
                     live=False)
    wall = time.monotonic() - t0
    import ray

    ray.shutdown()
    import pandas as pd

    df = pd.read_parquet(work / "out" / "cells")
    cells = len(df)
    ideal = cells * args.sleep / args.gpus
    written = [os.stat(work / "out" / "cells" / f"{k}.parquet").st_mtime for k in df.cell_key]
    lag_ms = [(w - e.timestamp()) * 1e3 for w, e in zip(written, df.ended_at)]
    manifest = json.loads((work / "out" / "sweep.json").read_text())
    # where the time went, per GPU: before its first cell, between one unit's last cell and the next one's first
    units = df.assign(start=df.started_at.map(lambda t: t.timestamp()), end=df.ended_at.map(lambda t: t.timestamp()))
    units = units.groupby("model").agg(gpu=("cuda_visible_devices", "first"), start=("start", "min"),
                                       end=("end", "max")).sort_values("start")
    first = units.start.min()
    gaps = [b.start - a.end for _, g in units.groupby("gpu") for (_, a), (_, b) in zip(g.iterrows(), g.iloc[1:].iterrows())]
    per_gpu_busy = units.groupby("gpu").apply(lambda g: g.end.max() - g.start.min())
    result = {
        "cells": cells, "units": args.units, "gpus": args.gpus, "sleep_s": args.sleep, "exit_code": code,
        "sweep_wall_s": round(manifest["wall_s"], 2), "command_wall_s": round(wall, 2), "ideal_s": ideal,
        "wall_over_ideal": round(manifest["wall_s"] / ideal, 3),
        "per_cell_overhead_ms": round(statistics.mean(
            (per_gpu_busy[g] - n * args.sleep) / n for g, n in df.cuda_visible_devices.value_counts().items()) * 1e3, 1),
        "start_up_s": round(manifest["wall_s"] - per_gpu_busy.max(), 2),
        "amortized_overhead_ms_per_cell": round((manifest["wall_s"] - ideal) * args.gpus / cells * 1e3, 1),
        "row_lag_ms_median": round(statistics.median(lag_ms), 1), "row_lag_ms_p99": round(sorted(lag_ms)[int(0.99 * len(lag_ms))], 1),
        "distinct_unit_processes": int(df.worker_pid.nunique()),
        "first_cells_spread_s": round(units.groupby("gpu").start.min().max() - first, 2),
        "unit_to_unit_gap_ms_median": round(statistics.median(gaps) * 1e3, 1) if gaps else None,
        "unit_to_unit_gap_ms_max": round(max(gaps) * 1e3, 1) if gaps else None,
        "busy_span_per_gpu_s": [round(x, 2) for x in per_gpu_busy],
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
