"""Compiled-decode rows measured before compiled decode's version 3, read again: each timed run made a new static
cache, and CUDA graph trees recorded the decode step again at a run's first step whenever the new cache's tensors
landed elsewhere. The per-step samples show it. For each compiled cell: the mean decode step as published, the mean of
the replays alone (every run's first step left out: a slight underestimate, since even a replayed first step after the
eager prefill is slower), how many runs' first step was over 3 times the run's median step, and the speed ratio to the
baseline's cell under both. A ratio's verdict holds only where both agree (faster: both under 1; slower: both over 1).

  python bench/compiled_replays.py DIR [DIR ...] [--json OUT]

DIR: sweep output folders (their cells/); rows of other decode modes or later versions are left out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pandas as pd

from reports.data import decode_runs
from reports.tables import replays_ms, rerecorded_compiled


def cell_figures(row) -> dict:
    rs = decode_runs(row)
    return {"model": row["model"], "precision": row["precision"], "baseline": row["baseline"],
            "prompt_tokens": int(row["prompt_tokens"]), "batch_size": int(row["batch_size"]),
            "gpu": str(row["gpu_uuid"])[-4:], "published_ms": float(row["decode_ms_per_token"]),
            "replays_ms": replays_ms(row), "first_steps_ms": [round(r[0], 2) for r in rs],
            "rerecorded_runs": sum(r[0] > 3 * statistics.median(r) for r in rs), "runs": len(rs)}


def with_ratios(cells: list[dict]) -> list[dict]:
    base = {(c["model"], c["prompt_tokens"], c["batch_size"]): c for c in cells if c["precision"] == c["baseline"]}
    for c in cells:
        b = base.get((c["model"], c["prompt_tokens"], c["batch_size"]))
        if b is None or b is c:
            continue
        c["other_gpu"] = b["gpu"] != c["gpu"]
        c["ratio_published"] = c["published_ms"] / b["published_ms"]
        c["ratio_replays"] = c["replays_ms"] / b["replays_ms"] if c["replays_ms"] and b["replays_ms"] else None
        both = [c["ratio_published"], c["ratio_replays"]]
        c["verdict"] = ("faster" if all(r is not None and r < 1 for r in both) else
                        "slower" if all(r is not None and r > 1 for r in both) else "undecided")
    return cells


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    df = rerecorded_compiled(pd.concat([pd.read_parquet(d / "cells") for d in args.dirs], ignore_index=True))
    cells = with_ratios(sorted((cell_figures(r) for _, r in df.iterrows()),
                               key=lambda c: (c["model"], c["precision"], c["prompt_tokens"], c["batch_size"])))
    print(f"{'model':14} {'precision':34} {'prompt':>6} {'batch':>5} {'published':>9} {'replays':>8} {'re-rec':>6} "
          f"{'ratio pub':>9} {'ratio rep':>9}  verdict (†: baseline on another GPU)")
    for c in cells:
        rp, rr = c.get("ratio_published"), c.get("ratio_replays")
        print(f"{c['model']:14} {c['precision']:34} {c['prompt_tokens']:6} {c['batch_size']:5} "
              f"{c['published_ms']:9.2f} {c['replays_ms']:8.2f} {c['rerecorded_runs']:>3}/{c['runs']:<2} "
              f"{'' if rp is None else f'{rp:9.2f}':>9} {'' if rr is None else f'{rr:9.2f}':>9}  "
              f"{c.get('verdict', '')}{' †' if c.get('other_gpu') else ''}")
    if args.json:
        args.json.write_text(json.dumps(cells, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
