"""The quickstart on this machine: the README's sweep (grid.yaml: SmolLM2-135M in fp32, nf4 and LLM.int8 on CPU),
from command to report, with where the time goes (Ray's start, each unit's load and quality pass, the cells).

  python benchmarks/quickstart.py [--output DIR] [--output-json FILE]

Needs the project set up (scripts/setup.sh) and WIKITEXT2_PATH. A first run on a machine also converts the GGUF file
once (cached in $QSWEEP_CACHE or ~/.cache/quant-sweep): pass a fresh QSWEEP_CACHE to time that too.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=None, help="the sweep's output folder (default: a new temporary one)")
    ap.add_argument("--output-json", help="also write the result to this file")
    args = ap.parse_args()
    out = Path(args.output or tempfile.mkdtemp(prefix="quickstart-"))
    cmd = [sys.executable, "-m", "orchestrator", "sweep", str(ROOT / "grid.yaml"), "--output", str(out)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    import pandas as pd

    manifest = json.loads((out / "sweep.json").read_text())
    rows = pd.read_parquet(out / "cells")
    units = rows.groupby("precision").agg(load_s=("load_wall_s", "max"), quality_s=("quality_wall_s", "max"),
                                          cells_s=("latency_s", "sum")).round(1)
    result = {"command": " ".join(cmd[1:]), "exit": r.returncode, "command_to_report_s": round(wall, 1),
              "sweep_wall_s": round(manifest.get("wall_s") or 0, 1), "cells": int(len(rows)),
              "ok": int((rows.status == "ok").sum()), "units": units.to_dict(orient="index"),
              "perplexity": rows.groupby("precision").perplexity.first().round(2).to_dict()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output_json:
        Path(args.output_json).write_text(text + "\n")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
