"""What else ran on the unit's CPUs while its runs were timed. Host-bound decode (eager on a GPU, and compiled cells
whose host issues each step slower than the GPU runs it) moves with it: on a 2-GPU host (11-30h) one GPU's eager steps
went from 64 to 82-130 ms in stretches while the other GPU's sweep compiled cells (likely: inductor's workers take
every CPU they see; the 1-minute load average could not tell). Linux's /proc/stat counts each CPU's busy time (in
clock ticks, 10 ms); the busy time on the CPUs this process may use, less this process's own CPU time, over a run's
wall time is how many of them other processes kept busy."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

STAT = "/proc/stat"
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system (idle iowait) irq softirq steal (a VM's CPU given to other
                                  # guests: contention too); guest is counted in user


def busy_seconds(stat_text: str, cpus: set[int], tick_hz: float) -> float:
    """Busy seconds since boot of `cpus`, from /proc/stat's per-CPU lines ("cpuN user nice system idle ...")."""
    total = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in rest.split()]
            total += sum(values[i] for i in BUSY_FIELDS if i < len(values))
    return total / tick_hz


def other_busy_cpus(busy_s: float, own_cpu_s: float, wall_s: float) -> float | None:
    """CPUs kept busy by other processes over `wall_s`, from the busy and own-CPU seconds of that span (never below
    0: the tick counters and the process's times round differently)."""
    return max(0.0, (busy_s - own_cpu_s) / wall_s) if wall_s > 0 else None


class HostCpu:
    """Tracks other processes' use of this process's CPUs over each timed run (`with tracker.run(): ...`); columns()
    gives the mean over all runs together and the largest of a single run. Off Linux the columns stay empty."""

    def __init__(self):
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self.available = self.cpus is not None and os.path.exists(STAT)
        self.tick_hz = os.sysconf("SC_CLK_TCK") if self.available else None
        self.spans: list[tuple[float, float, float]] = []  # per run: (busy s, own CPU s, wall s)

    def _read(self) -> tuple[float, float, float]:
        with open(STAT) as f:
            busy = busy_seconds(f.read(), self.cpus, self.tick_hz)
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()

    @contextmanager
    def run(self):
        if not self.available:
            yield
            return
        before = self._read()
        yield
        after = self._read()
        self.spans.append(tuple(a - b for a, b in zip(after, before)))

    def columns(self) -> dict:
        if not self.available or not self.spans:
            return {"host_cpus": len(self.cpus) if self.cpus else None}
        total = [sum(s[i] for s in self.spans) for i in range(3)]
        per_run = [other_busy_cpus(*s) for s in self.spans]
        return {"host_cpus": len(self.cpus), "host_other_busy_cpus": other_busy_cpus(*total),
                "host_other_busy_cpus_max": max((v for v in per_run if v is not None), default=None)}
