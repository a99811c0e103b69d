"""What else ran on the unit's CPUs while its runs were timed. Host-bound decode (eager on a GPU, and compiled cells
whose host issues each step slower than the GPU runs it) moves with it: on a 2-GPU host one GPU's eager steps went
from 64 to 82-130 ms in stretches while the other GPU's sweep compiled cells (likely: inductor's workers take
every CPU they see; the 1-minute load average could not tell). Linux's /proc/stat counts each CPU's busy time (in
clock ticks, 10 ms); the busy time on the CPUs this process may use, less this process's own CPU time, over a span's
wall time is how many of them other processes kept busy. A tick per CPU is a large share of a short run (a tiny
model's run on 2 CPUs read 4 CPUs busy), so runs are counted in stretches of at least MIN_SPAN_S."""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager

STAT = "/proc/stat"
MIN_SPAN_S = 0.25  # consecutive timed runs counted together up to this wall time: 32 CPUs' ticks err by 1.3 CPUs
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system (idle iowait) irq softirq steal (a VM's CPU given to other
                                  # guests: contention too); guest is counted in user


PROBE_LOOPS = 20_000  # about 1 ms of plain Python on a current server core


def probe_ms(repeats: int = 5) -> float:
    """The host's pace for plain Python now: the median ms of `repeats` runs of a fixed loop, the kind of work that
    paces an eager decode step. It slows where the core is shared (a busy hyperthread sibling, which /proc/stat
    counts on the sibling's CPU, not this one), clocked down, or taken by the hypervisor."""
    times = []
    for _ in range(repeats):
        t, x = time.perf_counter(), 0
        for i in range(PROBE_LOOPS):
            x += i & 7
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


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
    gives the mean over all runs together and the busiest stretch of them. Off Linux the columns stay empty."""

    def __init__(self):
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self.available = self.cpus is not None and os.path.exists(STAT)
        self.tick_hz = os.sysconf("SC_CLK_TCK") if self.available else None
        self.spans: list[tuple[float, float, float]] = []  # per run: (busy s, own CPU s, wall s)
        self.probes: dict[str, float] = {}  # probe_ms before and after the timed runs

    def probe(self, when: str) -> None:
        self.probes[when] = probe_ms()

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
        """host_cpus and the CPUs others kept busy (_busy_columns); the pace probes."""
        return {**self._busy_columns(), **{f"host_probe_{when}_ms": ms for when, ms in self.probes.items()}}

    def _busy_columns(self) -> dict:
        """host_cpus; the CPUs others kept busy over all timed runs and over the busiest stretch of them (both
        within 0 and host_cpus; empty where the runs took under MIN_SPAN_S together)."""
        if not self.available:
            return {"host_cpus": len(self.cpus) if self.cpus else None}
        stretches = _stretches(self.spans, MIN_SPAN_S)
        if not stretches:
            return {"host_cpus": len(self.cpus)}
        n = len(self.cpus)
        busy = [min(n, other_busy_cpus(*s)) for s in stretches]
        total = [sum(s[i] for s in stretches) for i in range(3)]
        return {"host_cpus": n, "host_other_busy_cpus": min(n, other_busy_cpus(*total)),
                "host_other_busy_cpus_max": max(busy)}


def _stretches(spans: list[tuple[float, float, float]], min_s: float) -> list[tuple[float, float, float]]:
    """Consecutive spans (busy s, own CPU s, wall s) summed into stretches of at least `min_s` of wall time; a short
    remainder joins the last stretch; none if all together are shorter."""
    out, acc = [], (0.0, 0.0, 0.0)
    for s in spans:
        acc = tuple(a + b for a, b in zip(acc, s))
        if acc[2] >= min_s:
            out.append(acc)
            acc = (0.0, 0.0, 0.0)
    if acc[2] > 0 and out:
        out[-1] = tuple(a + b for a, b in zip(out[-1], acc))
    return out
