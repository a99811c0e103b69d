"""A results folder's decode steps, cell by cell: each run's mean gap, its first step, the steady steps' median (the
fourth step on) and the host's time per step, so that a run's first steps (the first compiled calls after the eager
prefill, a host that falls behind) can be told from its steady pace. Reads the rows' decode_ms_samples.

  python bench/decode_steps.py FOLDER [FOLDER ...] [--started]   (--started: order by start time, with it)
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pyarrow.parquet as pq

COLS = ["model", "precision", "decode", "prompt_tokens", "batch_size", "new_tokens", "status", "started_at",
        "decode_ms_per_token", "decode_host_ms_per_token", "decode_ms_samples", "host_other_busy_cpus_max"]


def rows(folder: Path) -> list[dict]:
    out = []
    for f in sorted((folder / "cells").glob("*.parquet")):
        t = pq.read_table(f)
        out.append({c: (t.column(c)[0].as_py() if c in t.column_names else None) for c in COLS})
    return [r for r in out if r["status"] == "ok" and r["decode_ms_samples"]]


def steps(r: dict) -> dict:
    gaps, per_run = r["decode_ms_samples"], r["new_tokens"] - 1
    runs = [gaps[i:i + per_run] for i in range(0, len(gaps), per_run)]
    steady = [g for run in runs for g in run[3:]]
    return {"run_means": [statistics.fmean(run) for run in runs], "first": [run[0] for run in runs],
            "steady_median": statistics.median(steady) if steady else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--started", action="store_true")
    args = ap.parse_args()
    for folder in args.folders:
        order = (lambda r: str(r["started_at"] or "")) if args.started else (
            lambda r: (r["model"], r["precision"], r["decode"], r["batch_size"], r["prompt_tokens"]))
        print(folder)
        for r in sorted(rows(folder), key=order):
            s = steps(r)
            host = r["decode_host_ms_per_token"]
            busy = r["host_other_busy_cpus_max"]
            print(f"  {str(r['started_at'] or '')[11:19]} {r['model']} {r['precision']} {r['decode']} "
                  f"{r['prompt_tokens']}x{r['batch_size']}: {r['decode_ms_per_token']:.2f} ms/token, runs "
                  + " / ".join(f"{m:.2f}" for m in s["run_means"])
                  + ", first steps " + " / ".join(f"{f:.1f}" for f in s["first"])
                  + (f", steady median {s['steady_median']:.2f}" if s["steady_median"] is not None else "")
                  + (f", host {host:.2f}" if host is not None else "")
                  + (f", others took up to {busy:.1f} CPUs" if busy is not None else ""))


if __name__ == "__main__":
    main()
