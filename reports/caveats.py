"""What may move the report's numbers, as rules: each one selects rows and says, in a sentence, what they share and
why it matters, then names them. A new caveat is one Rule here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from reports.data import MAX_DECODE_BOUND, MIN_DECODE_SHARE, col, numeric

HOST_BOUND = 0.9   # host time to issue a decode step, as a share of the step's device time, from which the GPU waited
CROWDED = 0.5      # share of the unit's CPUs other processes kept busy in a stretch of timed runs
SLOW_HOST = 1.5    # a host pace probe this many times the host's median probe: the host ran plain Python slower


@dataclass(frozen=True)
class Rule:
    select: Callable[[pd.DataFrame], pd.DataFrame]   # the rows it is about
    sentence: Callable[[pd.DataFrame], str]          # what they share, given them
    detail: Callable[[object], str] | None = None    # per row, beside its name


def _ok(df: pd.DataFrame) -> pd.Series:
    return col(df, "status") == "ok"


def host_bound(df: pd.DataFrame) -> pd.DataFrame:
    """ok compiled GPU cells whose decode steps took the host nearly as long to issue as the GPU took between them
    (a CUDA-graph step is one launch: a host that keeps up runs ahead of the GPU)."""
    share = numeric(df, "decode_host_ms_per_token") / numeric(df, "decode_ms_per_token")
    return df[_ok(df) & (col(df, "device") == "cuda") & (col(df, "decode") == "compiled")
              & (col(df, "engine").fillna("hf") == "hf") & (share >= HOST_BOUND)]


def slow_host(df: pd.DataFrame) -> pd.DataFrame:
    """ok cells whose host pace probe (the slower of before and after the timed runs) took SLOW_HOST times the
    median of every probe on that host or more (3 cells' probes at least), with `probe_ms` and `usual_ms`."""
    if "host_probe_before_ms" not in df or "host_probe_after_ms" not in df:
        return df.iloc[0:0]
    probes = df[["host_probe_before_ms", "host_probe_after_ms"]].apply(pd.to_numeric, errors="coerce")
    host = col(df, "host").astype(object).fillna("")
    usual = pd.concat([probes.host_probe_before_ms, probes.host_probe_after_ms]).groupby(
        pd.concat([host, host]).values).median()
    counted = probes.notna().any(axis=1).groupby(host.values).sum()
    out = df.assign(probe_ms=probes.max(axis=1), usual_ms=host.map(usual))
    enough = host.map(counted).fillna(0) >= 3
    return out[_ok(df) & enough & (out.probe_ms >= SLOW_HOST * out.usual_ms)]


RULES = [
    Rule(lambda d: d[col(d, "measurement_note").notna()],
         lambda d: f"{len(d)} cell(s) were measured by an older version of the measurement, whose numbers are not "
                   "comparable with the rest: " + "; ".join(sorted(set(col(d, "measurement_note").dropna()))),
         None),
    Rule(lambda d: d[col(d, "noisy_timing").fillna(False).astype(bool)],
         lambda d: f"{len(d)} cell(s) have noisy timing (the coefficient of variation across timed runs over 5%): "
                   "they make no speed claim"),
    Rule(lambda d: d[col(d, "gpu_other_processes").fillna(0) > 0],
         lambda d: f"{len(d)} cell(s) shared their GPU with other processes (up to "
                   f"{numeric(d, 'gpu_other_process_bytes').max() / 1e6:,.0f} MB): their timings and memory may be "
                   "off",
         lambda r: f"pids {r.gpu_other_pids}"),
    Rule(host_bound,
         lambda d: f"{len(d)} compiled cell(s) on a GPU decoded host-bound: the host took {HOST_BOUND:.0%} or more of "
                   "each step's time to issue it, so their decode ms/token are this host's CPU, not the GPU, and "
                   "move with it",
         lambda r: f"{r.decode_host_ms_per_token:.2f} of {r.decode_ms_per_token:.2f} ms"),
    Rule(lambda d: d[_ok(d) & (numeric(d, "host_other_busy_cpus_max") >= CROWDED * numeric(d, "host_cpus"))],
         lambda d: f"{len(d)} cell(s) were timed while other processes kept at least {CROWDED:.0%} of the unit's CPUs "
                   "busy: decode the host paces (on CPU, eager on a GPU, host-bound compiled cells) slows with them",
         lambda r: f"up to {r.host_other_busy_cpus_max:.1f} of {r.host_cpus:.0f} CPUs"),
    Rule(slow_host,
         lambda d: f"{len(d)} cell(s) were timed while their host ran plain Python at least {SLOW_HOST:g}× slower "
                   "than it usually did (its pace probe): host-paced decode slows with it",
         lambda r: f"probe {r.probe_ms:.2f} against {r.usual_ms:.2f} ms"),
    Rule(lambda d: d[numeric(d, "decode_energy_share") < MIN_DECODE_SHARE],
         lambda d: f"{len(d)} cell(s) have no joules per decode token: decode's energy is the generations' less "
                   f"their prefills', and decode was under {MIN_DECODE_SHARE:.0%} of it, so a few percent's error in "
                   "the prefills' would be tens of percent of decode's (the Parquet keeps the figure)",
         lambda r: f"decode {r.decode_energy_share:.1%} of the energy"),
    Rule(lambda d: d[(numeric(d, "decode_energy_bound") > MAX_DECODE_BOUND)
                     & ~(numeric(d, "decode_energy_share") < MIN_DECODE_SHARE)],
         lambda d: f"{len(d)} cell(s) have no joules per decode token: NVML's energy counter moves in steps and a "
                   f"reading lags by up to one, and their energy windows were too short to give them within "
                   f"±{MAX_DECODE_BOUND:.0%} (the Parquet keeps the figure)",
         lambda r: f"±{r.decode_energy_bound:.0%}"),
]


def _cells(rows: pd.DataFrame, detail) -> str:
    """The first 8 cells of `rows`, each with `detail(row)` where there is one."""
    return "; ".join(f"{r.model} × {r.variant} {r.decode} p={r.prompt_tokens} b={r.batch_size}"
                     + (f" ({detail(r)})" if detail else "")
                     for r in rows.head(8).itertuples()) + ("; …" if len(rows) > 8 else "")


def caveats(df: pd.DataFrame) -> list[str]:
    out = [f"{model}: {note}." for model, note in
           (df.groupby("model")["weights_note"].first().dropna().items() if "weights_note" in df else [])]
    for rule in RULES:
        rows = rule.select(df)
        if len(rows):
            out.append(f"{rule.sentence(rows)}: {_cells(rows, rule.detail)}.")
    if "device" in df and (df.device == "cpu").any():
        out.append("Cells that ran on CPU have no per-phase GPU peaks: their memory is the process's resident set "
                   "(peak so far, everything the process loaded included), and the bandwidth limit is a measured CPU "
                   "copy. No energy is measured on CPU.")
    return out
