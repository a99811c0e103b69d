"""How finely NVML's total-energy counter moves (issue 16, item 2), so that decode's energy can be read around a
decode stretch of its own rather than as the timed runs' energy less their prefills' (which the report withholds
where decode was under a fifth of that energy: a 7B's torchao-int4wo, every compiled 7B cell at 4064 x 32).

Polls the counter as fast as Python can, first with the GPU idle, then while a thread keeps it multiplying matrices,
and records the moments the value changed: the counter's update interval (ms between changes), its step (J a change),
and the power over each phase. A window of T ms read around work can be off by up to one step at each end, so a
decode stretch must last many update intervals before its joules mean something.

  python bench/energy_counter.py [--seconds 3] > energy-counter.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.energy import EnergyMeter, changes, update_gaps_ms  # noqa: E402  (as the measurement reads the counter)


def summary(samples: list[tuple[float, float]]) -> dict:
    """The counter's update interval and step over one phase of polls, and the power it implies."""
    moved, gaps = changes(samples), update_gaps_ms(samples)
    steps = [b[1] - a[1] for a, b in zip(moved, moved[1:])]
    span = samples[-1][0] - samples[0][0] if len(samples) > 1 else 0.0

    def q(v: list[float], f: float):
        return round(sorted(v)[int(f * (len(v) - 1))], 3) if v else None

    return {"polls": len(samples), "poll_us": round(span / max(len(samples) - 1, 1) * 1e6, 2),
            "changes": len(moved) - 1, "update_ms_median": round(statistics.median(gaps), 3) if gaps else None,
            "update_ms_p10": q(gaps, 0.1), "update_ms_p90": q(gaps, 0.9),
            "step_j_median": round(statistics.median(steps), 4) if steps else None,
            "power_w": round((samples[-1][1] - samples[0][1]) / span, 1) if span else None}


def poll(read, seconds: float) -> list[tuple[float, float]]:
    out, end = [], time.perf_counter() + seconds
    while (t := time.perf_counter()) < end:
        out.append((t, read()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="polling time per phase (default 3)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"missing": "no CUDA GPU: NVML's energy counter is an NVIDIA GPU's"}))
        return
    import pynvml

    read = EnergyMeter("cuda:0").reading
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    time.sleep(1.0)  # the last work's power settles
    idle = poll(read, args.seconds)
    stop = threading.Event()

    def load() -> None:  # matmuls issued a few at a time, so the queue never runs dry and never grows long
        while not stop.is_set():
            for _ in range(4):
                a @ a
            torch.cuda.synchronize()

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(0.5)
    busy = poll(read, args.seconds)
    stop.set()
    worker.join()
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "driver": pynvml.nvmlSystemGetDriverVersion(),
                      "idle": summary(idle), "busy": summary(busy)}, indent=1))


if __name__ == "__main__":
    main()
