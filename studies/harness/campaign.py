"""Run a study's campaign on a GPU host: its sweeps one after another, each the project's own command
(`python -m orchestrator sweep GRID --output DIR/<name> --set ...`), in the order listed (on a host held for minutes,
the order decides what a campaign cut short has measured).

  python3 studies/harness/campaign.py studies/<study>/campaign.yaml --results DIR

A campaign file:
  about: what it measures, in one line
  sweeps:
    - name: quality                      # results in DIR/<name>, its output in DIR/<name>.log
      grid: grids/quality.yaml           # relative to the campaign file
      set: ["generation.repeats=5"]      # optional --set overrides
      env: {PYTORCH_CUDA_ALLOC_CONF: "expandable_segments:True"}   # optional
      output: quality                    # optional: another sweep's folder (its cells done there are not measured again)
DIR/exits.txt gets "<name> exit <code> after <s> s" per sweep, DIR/all.done when every sweep has ended, and
DIR/versions.json the versions of what ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGES = ("torch", "transformers", "vllm", "ray", "bitsandbytes", "torchao", "gptqmodel", "accelerate")


def load(path: Path) -> dict:
    c = yaml.safe_load(path.read_text())
    if not isinstance(c, dict) or not isinstance(c.get("sweeps"), list):
        raise SystemExit(f"{path}: a campaign needs `sweeps:` (a list)")
    for i, s in enumerate(c["sweeps"]):
        if not isinstance(s, dict) or "name" not in s or "grid" not in s:
            raise SystemExit(f"{path}: sweeps[{i}] needs a name and a grid")
    return c


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def command(sweep: dict, campaign_dir: Path, results: Path) -> list[str]:
    cmd = [sys.executable, "-m", "orchestrator", "sweep", str(campaign_dir / sweep["grid"]),
           "--output", str(results / sweep.get("output", sweep["name"]))]
    for s in sweep.get("set") or []:
        cmd += ["--set", s]
    return cmd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("campaign")
    ap.add_argument("--results", required=True)
    args = ap.parse_args()
    path = Path(args.campaign).resolve()
    campaign, results = load(path), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "versions.json").write_text(json.dumps(versions(), indent=2))
    commands = []
    for sweep in campaign["sweeps"]:
        cmd = command(sweep, path.parent, results)
        commands.append({"name": sweep["name"], "command": cmd, "env": sweep.get("env") or {}})
        (results / "commands.json").write_text(json.dumps(commands, indent=2))
        t0 = time.monotonic()
        with open(results / f"{sweep['name']}.log", "w") as log:
            code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **{k: str(v) for k, v in (sweep.get("env") or {}).items()}})
        with open(results / "exits.txt", "a") as f:
            f.write(f"{sweep['name']} exit {code} after {time.monotonic() - t0:.0f} s\n")
    (results / "all.done").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
