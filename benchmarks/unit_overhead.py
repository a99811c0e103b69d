"""Where a sweep's time goes: the notebook's own case from command to report, and per unit the
seconds outside loading and measuring, and latency_s against the timed work.

  python benchmarks/unit_overhead.py [--grid examples/notebook.yaml] [--output DIR] [--set KEY=VALUE ...]

Runs `python -m orchestrator sweep` as a user would (an embedded Ray) and prints JSON:
- command_to_report_s: wall time of the whole command (Ray's start, every unit, the report);
- per unit: unit_s (the driver's span from the unit's start event to its end), inside_s (the unit's setup, its
  whole load step, its whole quality step, every cell's latency_s; their parts in inside_parts), outside_s =
  unit_s - inside_s, and the parts of it that are timed (from the start event to the unit's entry, the process's
  exit after its last row, from there to the driver's end of the unit) with what is left unaccounted; before_start:
  the fork (with the fork server's start for a worker's first unit), which precedes the start event; alongside: the
  worker's hand-over of the baseline's reference, while the unit goes on measuring;
- per cell: latency_s against timed_work_s = (warm-up + timed runs) x new_tokens x decode ms/token, and the parts
  the rows record (warmup_s, timed_s, energy_prefill_s, memory_run_s).
Goals: outside_s <= 1 s; latency_s <= 1.15 x timed work; the notebook's case <= 60 s on one H200.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default=str(ROOT / "examples" / "notebook.yaml"))
    ap.add_argument("--output", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--output-json", help="also write the result to this file")
    args = ap.parse_args()
    out = Path(args.output or tempfile.mkdtemp(prefix="bench-overhead-"))
    cmd = [sys.executable, "-m", "orchestrator", "sweep", args.grid, "--output", str(out), "--force"]
    for o in args.overrides:
        cmd += ["--set", o]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    import pandas as pd

    manifest = json.loads((out / "sweep.json").read_text())
    df = pd.read_parquet(out / "cells")
    df = df[df.run_id == manifest["run_id"]]
    units = []
    for uid, g in df.groupby("unit_id"):
        unit_s = next((v for k, v in manifest.get("per_unit_s", {}).items() if k.startswith(uid)), None)
        first = g.iloc[0]
        walls = pd.notna(first.get("load_wall_s"))  # rows that record the unit's own walls
        if walls:
            # the unit's own walls: its setup, the whole load step, the whole quality step, every cell
            inside = sum(float(first[k]) for k in ("unit_setup_s", "load_wall_s", "quality_wall_s"))
        else:  # rows from before those columns: the timed parts of loading and perplexity
            inside = sum(float(first[k]) for k in ("prepare_s", "load_s", "quantize_s", "ppl_s", "calibration_s")
                         if k in first and first[k] == first[k] and not (k == "calibration_s" and first.get(
                             "calibration_cached")))
        inside += float(g.latency_s.sum())
        parts = dict(next((v for k, v in manifest.get("per_unit_parts", {}).items() if k.startswith(uid)), {}))
        t_start, t_end = parts.pop("driver_started_at", None), parts.pop("driver_ended_at", None)
        before_start = {"fork_s": parts.pop("fork_s")} if "fork_s" in parts else {}  # before the unit's span
        # the worker hands the baseline's reference to the object store while the unit goes on measuring: alongside
        # the unit's own time, not outside it (else "unaccounted" comes out negative by as much)
        alongside = {"reference_put_s": parts.pop("reference_put_s")} if "reference_put_s" in parts else {}
        if t_start and pd.notna(first.get("unit_started_at")):
            # the driver's clock against the unit's: from the start event to the unit's entry, and from its last
            # row to the driver's end of the unit (the same host's wall clock)
            parts["before_entry_s"] = pd.Timestamp(first.unit_started_at).timestamp() - t_start
            parts["after_last_row_s"] = t_end - pd.Timestamp(g.ended_at.max()).timestamp() - parts.get("exit_s", 0)
        if not walls:
            parts.update({k: float(first[k]) for k in ("unit_setup_s", "reference_save_s", "reference_load_s")
                          if k in first and first[k] == first[k]})
        loading = {k: float(first[k]) for k in ("import_s", "prepare_s", "load_s", "quantize_s", "tokenizer_s",
                                               "load_wall_s", "ppl_s", "reference_save_s", "reference_load_s",
                                               "quality_wall_s") if k in first and first[k] == first[k]}
        units.append({"unit": f"{first.model} x {first.precision}", "unit_s": unit_s, "inside_s": inside,
                      "before_start": before_start, "alongside": alongside,
                      "outside_s": unit_s - inside if unit_s else None,
                      "outside_parts": parts,
                      "outside_unaccounted_s": unit_s - inside - sum(parts.values()) if unit_s else None,
                      "inside_parts": loading, "load_s": first.load_s,
                      "ppl_s": first.get("ppl_s"), "perplexity": first.get("perplexity"),
                      "kl_mean": first.get("kl_mean")})
    cells = []
    for _, c in df.iterrows():
        runs = int(c.warmup) + int(c.get("repeats_done") or c.repeats)
        work = runs * int(c.new_tokens) * float(c.decode_ms_per_token) / 1e3 if c.decode_ms_per_token else None
        cells.append({"cell": f"{c.model} x {c.precision} n={c.new_tokens} b={c.batch_size}",
                      "latency_s": c.latency_s, "timed_work_s": work,
                      "ratio": c.latency_s / work if work else None,
                      "warmup_runs_s": [float(x) for x in c.get("warmup_runs_s")] if c.get("warmup_runs_s")
                      is not None else None,
                      **{k: c.get(k) for k in ("warmup_s", "timed_s", "energy_prefill_s", "memory_run_s",
                                               "decode_ms_per_token", "repeats_done")}})
    # after the timed command: what the fork server imported (its defaults and the extras it took)
    preload = subprocess.run([sys.executable, "-c", "import json, tasks.unit as U; print(json.dumps(U.PRELOAD))"],
                             cwd=ROOT, capture_output=True, text=True).stdout.strip().splitlines()
    result = json.dumps({"command": " ".join(cmd[1:]), "exit": r.returncode,
                      "preload": json.loads(preload[-1]) if preload else None,
                      "preload_extra": os.environ.get("QSWEEP_PRELOAD", ""),
                      "nvml_check": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK", ""), "command_to_report_s": wall,
                      "sweep_wall_s": manifest.get("wall_s"), "units": units, "cells": cells,
                      "stdout_tail": r.stdout[-1500:], "stderr_tail": r.stderr[-1500:]}, indent=1, default=float)
    print(result)
    if args.output_json:
        Path(args.output_json).write_text(result + "\n")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
