"""Check a sweep's Parquet for GPU pinning: units that ran at the same time had different GPUs, each unit's process
saw exactly one GPU, and (given `nvidia-smi --query-gpu=index,uuid --format=csv,noheader` output) the GPU it saw is the
one CUDA_VISIBLE_DEVICES named.

  python bench/check_pinning.py RESULTS_DIR [RESULTS_DIR ...] [--gpus GPUS_CSV] [--runs RUN_ID,RUN_ID]
Several folders: sweeps that shared one Ray cluster, checked together; --runs: only the rows of those runs (a folder
whose cells come from several hosts, one run per host).
"""
from __future__ import annotations

import sys
from itertools import combinations

import pandas as pd


def main(folders: list[str], gpus_csv: str | None = None, runs: list[str] | None = None) -> int:
    df = pd.concat([pd.read_parquet(f"{f}/cells") for f in folders])
    folder = " + ".join(folders)
    if runs:
        df = df[df.run_id.isin(runs)]
        folder += f" (runs {', '.join(runs)})"
    df = df[df.status == "ok"]
    # one span per unit process (a resumed unit ran in two processes: two spans)
    spans = df.groupby("worker_pid").agg(unit=("unit_id", "first"), gpu=("gpu_uuid", "first"),
                                         gpus_seen=("gpu_count", "max"), visible=("cuda_visible_devices", "first"),
                                         start=("started_at", "min"), end=("ended_at", "max"))
    overlaps = [(a.unit, b.unit) for (_, a), (_, b) in combinations(spans.iterrows(), 2)
                if a.start < b.end and b.start < a.end]
    shared = [(a.unit, b.unit) for (_, a), (_, b) in combinations(spans.iterrows(), 2)
              if a.start < b.end and b.start < a.end and a.gpu == b.gpu]
    print(f"{folder}: {len(spans)} unit processes, {spans.gpu.nunique()} GPUs used, {len(overlaps)} overlapping "
          f"pairs, {len(shared)} of them on the same GPU; GPUs seen per process: {sorted(set(spans.gpus_seen))}")
    bad = len(shared) + int((spans.gpus_seen != 1).sum())
    if gpus_csv:
        rows = [[f.strip() for f in line.split(",")] for line in open(gpus_csv).read().splitlines() if line.strip()]
        uuid = {int(r[0]): next(f for f in r if f.startswith("GPU-")).removeprefix("GPU-") for r in rows}
        wrong = spans[[uuid.get(int(v)) != g for v, g in zip(spans.visible, spans.gpu)]]
        print(f"CUDA_VISIBLE_DEVICES index -> NVML UUID matches the GPU the process used: "
              f"{len(spans) - len(wrong)} of {len(spans)}")
        bad += len(wrong)
    return 1 if bad else 0


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--gpus")
    ap.add_argument("--runs", type=lambda s: s.split(","))
    args = ap.parse_args()
    sys.exit(main(args.folders, args.gpus, args.runs))
