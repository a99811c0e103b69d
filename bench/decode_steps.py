"""A results folder's decode steps, cell by cell: each run's mean gap, its first step, the steady steps' median (the
fourth step on) and the host's time per step, so that a run's first steps (the first compiled calls after the eager
prefill, a host that falls behind) can be told from its steady pace; where rows have them, the CPUs others took and
the host's pace probe before and after the timed runs. Reads the rows' decode_ms_samples.

  python bench/decode_steps.py FOLDER [FOLDER ...] [--started]   (--started: order by start time, with it)
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from reports.data import decode_runs, per_run_decode, read_results, val


def steps(r) -> dict:
    runs = decode_runs(r)
    steady = [g for run in runs for g in run[3:]]
    return {"run_means": per_run_decode(r), "first": [run[0] for run in runs],
            "steady_median": statistics.median(steady) if steady else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--started", action="store_true")
    args = ap.parse_args()
    for folder in args.folders:
        df = read_results([folder])
        df = df[(df.status == "ok") & df["decode_ms_samples"].notna()] if "decode_ms_samples" in df else df.iloc[0:0]
        order = ["started_at"] if args.started else ["model", "precision", "decode", "batch_size", "prompt_tokens"]
        print(folder)
        for _, r in df.sort_values(order, kind="stable").iterrows():
            s = steps(r)
            host, busy = val(r.get("decode_host_ms_per_token")), val(r.get("host_other_busy_cpus_max"))
            probe = [val(r.get(f"host_probe_{w}_ms")) for w in ("before", "after")]
            print(f"  {str(val(r.get('started_at')) or '')[11:19]} {r['model']} {r['precision']} {r['decode']} "
                  f"{r['prompt_tokens']}x{r['batch_size']}: {r['decode_ms_per_token']:.2f} ms/token, runs "
                  + " / ".join(f"{m:.2f}" for m in s["run_means"])
                  + ", first steps " + " / ".join(f"{f:.1f}" for f in s["first"])
                  + (f", steady median {s['steady_median']:.2f}" if s["steady_median"] is not None else "")
                  + (f", host {host:.2f}" if host is not None else "")
                  + (f", others took up to {busy:.1f} CPUs" if busy is not None else "")
                  + (f", host probe {probe[0]:.2f} / {probe[1]:.2f} ms" if None not in probe else ""))


if __name__ == "__main__":
    main()
