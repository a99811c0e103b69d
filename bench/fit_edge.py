"""Check the memory model at its edge (issue 16, item 3): from a sweep's cells, the largest batch that the model
(reports/fit.py) says fits the GPU that ran them at a context length, then a sweep of that batch and one beyond it
on that GPU; prints predicted against measured peak and what happened to each batch (ok, or an `oom` row).

  python bench/fit_edge.py --cells DIR --grid GRID [--precisions fp16 nf4] [--prompt 4064] [--address auto]
                           [--output DIR]

The budget is the GPU's own memory (the rows' gpu_memory_bytes); the model keeps 1 GiB of it for the CUDA context and
the allocator (fit.RESERVE), so the batch one beyond may still fit inside that reserve: the output says which.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from reports import fit

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=Path, required=True, help="a sweep's output folder (its cells/)")
    ap.add_argument("--grid", required=True, help="the grid that made them (its model and settings are reused)")
    ap.add_argument("--precisions", nargs="+", default=["fp16", "nf4"])
    ap.add_argument("--prompt", type=int, default=4064)
    ap.add_argument("--address", default="")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    out = args.output or args.cells.parent / "fit-edge"
    df = pd.read_parquet(args.cells / "cells")
    df = fit.fitted_rows(df)
    results = []
    for name in args.precisions:
        cells = df[df.precision == name]
        p = fit.parameters(cells)
        if p is None:
            results.append({"precision": name, "problem": "no ok GPU cells to fit"})
            continue
        new_tokens = int(cells.new_tokens.max())
        context = args.prompt + new_tokens
        budget = float(cells.gpu_memory_bytes.dropna().max())
        batch = fit.largest_batch(p, context, budget)
        folder = out / name
        cmd = [sys.executable, "-m", "orchestrator", "sweep", args.grid, "--output", str(folder),
               "--set", f"precisions=[{name}]", "--set", f"baseline={name}",
               "--set", f"generation.batch_sizes=[{batch}, {batch + 1}]",
               "--set", f"generation.prompt_tokens={args.prompt}", "--set", f"generation.new_tokens=[{new_tokens}]",
               "--set", "generation.repeats=1", "--set", "generation.warmup=1"]
        if args.address:
            cmd += ["--address", args.address]
        code = subprocess.call(cmd, cwd=ROOT, stdout=sys.stderr)  # stdout is this script's JSON alone
        rows = pd.read_parquet(folder / "cells") if (folder / "cells").is_dir() else pd.DataFrame()
        measured = []
        for r, peak in zip(rows.itertuples(), fit.held(rows) if len(rows) else []):
            predicted = fit.peak(p, int(r.batch_size), context)  # against what the cell held (reserved peak)
            measured.append({"batch": int(r.batch_size), "status": r.status,
                             "predicted_peak_gb": predicted / 1e9,
                             "measured_peak_gb": peak / 1e9 if peak == peak and peak is not None else None,
                             "error": (peak / predicted - 1) if peak == peak and peak else None,
                             "message": (r.error_message or "")[:200] if r.status != "ok" else None})
        beyond = next((m for m in measured if m["batch"] == batch + 1), None)
        results.append({"precision": name, "context": context, "budget_gib": budget / fit.GiB,
                        "reserve_gib": fit.RESERVE / fit.GiB, "model": p, "predicted_largest_batch": batch,
                        "sweep_exit": code, "cells": sorted(measured, key=lambda m: m["batch"]),
                        "verdict": verdict(batch, measured, beyond, budget)})
    print(json.dumps({"cells_from": str(args.cells), "results": results}, indent=1, default=float))
    return 0


def verdict(batch: int, measured: list[dict], beyond: dict | None, budget: float) -> str:
    edge = next((m for m in measured if m["batch"] == batch), None)
    if edge is None or edge["status"] != "ok":
        return f"the predicted largest batch {batch} did NOT run ({edge and edge['status']}): the model is wrong"
    if beyond is None:
        return f"batch {batch} fits; batch {batch + 1} has no row"
    if beyond["status"] == "oom":
        return f"batch {batch} fits and batch {batch + 1} is out of memory, as predicted"
    held, room = beyond["measured_peak_gb"], (budget - fit.RESERVE) / 1e9
    if held > room:
        return (f"batch {batch} fits; batch {batch + 1} also ran ({beyond['status']}, held {held:.1f} GB): it fitted "
                f"inside the {fit.RESERVE / fit.GiB:g} GiB the model keeps for the CUDA context and the allocator")
    return (f"batch {batch} fits; batch {batch + 1} also ran ({beyond['status']}) holding {held:.1f} GB of the "
            f"{room:.1f} GB the model allows: the model over-predicted it by "
            f"{beyond['predicted_peak_gb'] / held - 1:.0%} (safe: its edge is at least one batch low here)")


if __name__ == "__main__":
    sys.exit(main())
