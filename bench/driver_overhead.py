"""Driver overhead on a grid of at least 200 cells whose measurement is a fixed sleep, on a local Ray with 4 fake GPUs.

  python bench/driver_overhead.py [--units 24] [--cells-per-unit 10] [--sleep 0.5]

Reports the per-cell overhead (time from a cell's end in the worker to its row on disk at the driver; goal <= 20 ms),
the per-unit start cost (submission to the worker's first cell) and the sweep wall time over the ideal
(cells x sleep / GPUs; goal <= 1.10). Not a test: numbers go in notes.
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
    args = ap.parse_args()

    import ray

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
    ray.init(num_cpus=os.cpu_count(), num_gpus=args.gpus, include_dashboard=False, log_to_driver=False)
    t0 = time.monotonic()
    code = sweep.run(str(work / "grid.yaml"), [], output=str(work / "out"), runner="bench.sleep_runner:run_unit",
                     live=False)
    wall = time.monotonic() - t0
    ray.shutdown()
    import pandas as pd

    df = pd.read_parquet(work / "out" / "cells")
    cells = len(df)
    ideal = cells * args.sleep / args.gpus
    written = [os.stat(work / "out" / "cells" / f"{k}.parquet").st_mtime for k in df.cell_key]
    lag_ms = [(w - e.timestamp()) * 1e3 for w, e in zip(written, df.ended_at)]
    manifest = json.loads((work / "out" / "sweep.json").read_text())
    result = {
        "cells": cells, "units": args.units, "gpus": args.gpus, "sleep_s": args.sleep, "exit_code": code,
        "sweep_wall_s": round(manifest["wall_s"], 2), "command_wall_s": round(wall, 2), "ideal_s": ideal,
        "wall_over_ideal": round(manifest["wall_s"] / ideal, 3),
        "per_cell_overhead_ms": round((manifest["wall_s"] - ideal) * args.gpus / cells * 1e3, 1),
        "row_lag_ms_median": round(statistics.median(lag_ms), 1), "row_lag_ms_p99": round(sorted(lag_ms)[int(0.99 * len(lag_ms))], 1),
        "distinct_workers": int(df.worker_pid.nunique()),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
