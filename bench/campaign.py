"""Run a GPU campaign: the sweeps a data file lists (bench/campaigns/*.yaml), on one Ray head that holds every GPU of
the host, each sweep joining it with --address auto, so that Ray hands GPUs to units as they free up.

  python bench/campaign.py CAMPAIGN.yaml --results DIR

A campaign file:
  about: one line on what it measures
  seed: [docs/results/...]         # optional: copy these folders' cells first (cells already measured on this
                                   # GPU type are not measured again); newest first: a cell in two folders is
                                   # taken from the first that has it
  before:                          # optional: commands run one after another before the Ray head starts (benches
    - {name: overhead, run: "python3 bench/unit_overhead.py --output {results}/o"}  # that start Ray themselves);
                                   # their output in DIR/<name>.out; {results} is DIR
  sweeps:
    - name: methods                # results in DIR/<name>
      grid: examples/gpu-methods.yaml
      set: ["generation.new_tokens=[128]"]   # optional --set overrides
      env: {PYTORCH_CUDA_ALLOC_CONF: "expandable_segments:True"}   # optional: its environment (a run entry too)
      after_s: 0                   # optional: start this many seconds after the campaign (Ray does not serve
                                   # concurrent drivers first come, first served: the longest start first)
    - {name: edge, run: "python3 bench/fit_edge.py --cells {results}/methods --address {address} ..."}
                                   # a command in place of a grid: run in its turn ({results}, {address} filled in)
  sequential: true                 # optional: one entry after another, in the listed order (on one GPU, the order
                                   # decides what a cut-short campaign has measured); else all at once
  gpu: 1                           # optional: this campaign has that GPU alone (CUDA_VISIBLE_DEVICES for all it
                                   # runs) and its sweeps start an embedded Ray each, no head: two campaigns with
                                   # gpu 0 and gpu 1 share a 2-GPU host side by side (bench/gpu.sh campaign A B)
  cpus: share                      # optional, with gpu: on a host of --gpus N GPUs, what it runs gets the gpu-th
                                   # of N equal slices of the host's physical cores, both hyperthreads of each
                                   # (cpus.txt says which) (the default: a sweep's torch.compile
                                   # workers take every CPU they see, and host-paced decode beside them slows:
                                   # tasks/host_cpu.py); `all` shares them all
Each sweep's log is DIR/<name>.log; DIR/exits.txt gets "<name> exit <code> after <s> s"; DIR/all.done when all end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load(path: Path) -> dict:
    c = yaml.safe_load(path.read_text())
    if not isinstance(c, dict) or not isinstance(c.get("sweeps"), list):
        raise SystemExit(f"{path}: a campaign needs `sweeps:` (a list)")
    for i, s in enumerate(c["sweeps"]):
        if "name" not in s or ("grid" in s) == ("run" in s):
            raise SystemExit(f"{path}: sweeps[{i}] needs a name and either a grid or a run")
    return c


def seed(campaign: dict, results: Path) -> None:
    for folder in campaign.get("seed") or []:
        if not (ROOT / folder).is_dir():  # not silently: every cell it holds would be measured again
            print(f"seed {folder}: not found under {ROOT}; its cells will be measured again", file=sys.stderr)
            continue
        for s in campaign["sweeps"]:
            src = ROOT / folder / s["name"] / "cells"
            if src.is_dir():
                dst = results / s["name"] / "cells"
                dst.mkdir(parents=True, exist_ok=True)
                for f in src.glob("*.parquet"):
                    if not (dst / f.name).exists():  # the first folder listed wins (the ninth session's seed
                        shutil.copy2(f, dst / f.name)  # order let 2026-11-29's rows replace 11-30b's repeats)


def before(campaign: dict, results: Path, pin=None) -> None:
    for step in campaign.get("before") or []:
        t0 = time.monotonic()
        with open(results / f"{step['name']}.out", "w") as out:
            code = subprocess.call(step["run"].format(results=results), shell=True, cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, preexec_fn=pin)
        with open(results / "exits.txt", "a") as f:
            f.write(f"{step['name']} exit {code} after {time.monotonic() - t0:.0f} s\n")


def ray_head(gpus: int) -> None:
    """One Ray head holding every GPU of the host, token authentication on (a token made if there is none)."""
    ray = str(Path(sys.executable).parent / "ray") if (Path(sys.executable).parent / "ray").exists() else "ray"
    subprocess.call([ray, "get-auth-token", "--generate"], stdout=subprocess.DEVNULL)
    subprocess.call([ray, "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.check_call([ray, "start", "--head", f"--num-gpus={gpus}", "--disable-usage-stats"],
                          stdout=subprocess.DEVNULL)


SYS_CPU = Path("/sys/devices/system/cpu")


def cores(cpus: list[int], sys_cpu: Path = SYS_CPU) -> list[list[int]]:
    """`cpus` grouped by physical core (hyperthread siblings together, as the kernel lists them), in order; each CPU
    its own core where the kernel does not say."""
    groups: dict[str, list[int]] = {}
    for c in cpus:
        f = sys_cpu / f"cpu{c}" / "topology" / "thread_siblings_list"
        groups.setdefault(f.read_text().strip() if f.exists() else str(c), []).append(c)
    return sorted(groups.values())


def cpu_share(gpu: int, gpus: int, cpus: list[int], sys_cpu: Path = SYS_CPU) -> list[int]:
    """The gpu-th of `gpus` equal slices of `cpus` (what the campaign on that GPU runs on), by whole physical cores:
    two campaigns on hyperthread siblings of one core would slow each other's host-paced decode (11-30j's eager fp16
    moved 1.6x between cells beside a campaign compiling on the other half: the cause not known)."""
    whole = cores(cpus, sys_cpu)
    n = len(whole)
    return sorted(c for core in (whole[gpu * n // gpus:(gpu + 1) * n // gpus] or whole) for c in core)


def run(campaign: dict, results: Path, address: str = "auto", gpus: int = 0) -> int:
    results.mkdir(parents=True, exist_ok=True)
    pin = None
    if campaign.get("gpu") is not None:  # one GPU of the host, an embedded Ray per sweep (a head would hold them all)
        os.environ["CUDA_VISIBLE_DEVICES"] = str(campaign["gpu"])
        if gpus > 1 and campaign.get("cpus", "share") == "share":
            mine = cpu_share(int(campaign["gpu"]), gpus, sorted(os.sched_getaffinity(0)))
            pin = lambda: os.sched_setaffinity(0, mine)  # noqa: E731 (in each child, before it runs)
            (results / "cpus.txt").write_text(f"GPU {campaign['gpu']} of {gpus}: CPUs {','.join(map(str, mine))}; "
                                              f"cores {' '.join('+'.join(map(str, c)) for c in cores(mine))}\n")
        address, gpus = "", 0
    seed(campaign, results)
    before(campaign, results, pin)
    if address == "auto" and gpus:
        ray_head(gpus)
    t0 = time.monotonic()
    procs, worst = [], 0

    def finish(name, proc, log) -> int:
        code = proc.wait()
        log.close()
        with open(results / "exits.txt", "a") as f:
            f.write(f"{name} exit {code} after {time.monotonic() - t0:.0f} s\n")
        return code

    entries = campaign["sweeps"] if campaign.get("sequential") else sorted(campaign["sweeps"],
                                                                           key=lambda s: s.get("after_s", 0))
    for s in entries:
        wait = s.get("after_s", 0) - (time.monotonic() - t0)
        if wait > 0:
            time.sleep(wait)
        if "run" in s:
            cmd = s["run"].format(results=results, address=address or "")
        else:
            cmd = [sys.executable, "-m", "orchestrator", "sweep", str(ROOT / s["grid"]), "--output",
                   str(results / s["name"])] + (["--address", address] if address else [])
            for item in s.get("set") or []:
                cmd += ["--set", item]
        log = open(results / f"{s['name']}.log", "a")
        env = {**os.environ, **{k: str(v) for k, v in (s.get("env") or {}).items()}}
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, shell=isinstance(cmd, str),
                                env=env, preexec_fn=pin)
        if campaign.get("sequential"):
            worst = max(worst, finish(s["name"], proc, log))
        else:
            procs.append((s["name"], proc, log))
    for name, proc, log in procs:
        worst = max(worst, finish(name, proc, log))
    (results / "all.done").touch()
    return worst


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("campaign", type=Path)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--address", default="auto", help="Ray address the sweeps join ('' for an embedded Ray each)")
    ap.add_argument("--gpus", type=int, default=0, help="start a Ray head with this many GPUs first (--address auto)")
    args = ap.parse_args()
    sys.exit(run(load(args.campaign), args.results, args.address, args.gpus))
