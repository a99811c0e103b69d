"""Reading result folders, and the small facts the report's tables and charts share: which cell a model is shown at,
precision order, method groups, one colour per precision. pandas and pyarrow only: no torch here."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from spec.catalog import H200_ENERGY_UPDATE_S
from spec.untrusted import MANIFEST_CAP, BadInput, parse_json, plain, read_regular_file
from spec.schema import row_problem

FAILED = ("error", "oom", "timeout")
SCHEMES = {"none": 0, "weight-only": 1, "weight+activation": 2}
# rows written before quant_scheme and weight_bits_nominal existed (bitsandbytes and unquantized only)
LEGACY = {"fp32": ("none", 32), "fp16": ("none", 16), "bf16": ("none", 16), "int8": ("weight-only", 8),
          "nf4": ("weight-only", 4), "fp4": ("weight-only", 4), "nf4-dq": ("weight-only", 4)}
# one colour per precision in every chart: tab20, then tab20b and tab20c, in the order precisions first appear
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3", "#8ca252",
           "#bd9e39", "#ad494a", "#a55194", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#6baed6"]
BROKEN_RATIO = 10.0  # perplexity more than this times the baseline's: broken, named, kept out of the charts' scales


def manifest(folder: Path) -> dict:
    """A results folder's sweep.json (capped, of bounded depth), {} where there is none or it cannot be read."""
    try:
        data = parse_json(read_regular_file(Path(folder) / "sweep.json", MANIFEST_CAP, "sweep.json"), "sweep.json",
                          str(folder))
    except BadInput:
        return {}
    return data if isinstance(data, dict) else {}


def latest_cells(folder: Path) -> set[str] | None:
    """The cell keys of the latest sweep's grid in an output folder (its sweep.json), None where it does not say."""
    keys = manifest(folder).get("cell_keys")
    return {k for k in keys if isinstance(k, str)} if isinstance(keys, list) else None


def read_results(dirs, unreadable: list[str] | None = None, every_row: bool = True) -> pd.DataFrame:
    """The rows under the given sweep output folders (or their cells/ folders), merged: every row, or with
    `every_row` false the cells of each folder's latest grid (a folder keeps the cells of earlier grids too). A file
    that cannot be read (truncated, not Parquet, no permission) is left out and named in `unreadable`."""
    tables = []
    for d in dirs:
        d = Path(d)
        cells = d / "cells" if (d / "cells").is_dir() else d
        wanted = None if every_row else latest_cells(d)
        for f in sorted(cells.glob("*.parquet")):
            if wanted is not None and f.stem not in wanted:
                continue
            problem = None
            if f.is_symlink() or not f.is_file():
                problem = "not a regular file"
            else:
                try:
                    table = pq.read_table(f)
                    problem = row_problem(f.stem, table)
                except (OSError, pa.ArrowException) as e:
                    problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            if problem is None:
                tables.append(table)
            elif unreadable is not None:
                unreadable.append(f"{f}: {problem}")
    if not tables:
        return pd.DataFrame(columns=["cell_key", "status", "model", "precision"])
    return as_plain_text(pa.concat_tables(tables, promote_options="default").to_pandas())


def as_plain_text(df: pd.DataFrame) -> pd.DataFrame:
    """Every text column with its control characters escaped (spec.untrusted.plain): rows come from a results folder,
    which is untrusted; tracebacks and messages keep their newlines."""
    out = df.copy()
    for name in out.columns:
        if out[name].dtype == object or pd.api.types.is_string_dtype(out[name].dtype):
            keep = name in ("traceback", "error_message", "ppl_error", "ppl_kv_error")
            out[name] = out[name].map(lambda v: plain(v, lines=keep) if isinstance(v, str) else v)
    return out


def col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def numeric(df: pd.DataFrame, name: str) -> pd.Series:
    """A column as numbers (NaN where missing or not a number; all NaN where the rows lack it)."""
    return pd.to_numeric(col(df, name), errors="coerce")


def val(x):
    """A cell's value, None for missing (NaN, NaT, None)."""
    if x is None:
        return None
    try:
        if isinstance(x, float) and math.isnan(x):
            return None
        if pd.isna(x) is True:
            return None
    except (TypeError, ValueError):  # lists and arrays
        pass
    return x


def first(series: pd.Series):
    s = series.dropna() if len(series) else series
    return val(s.iloc[0]) if len(s) else None


def with_axes(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with every axis filled (rows from before an axis existed: its default)."""
    return df.assign(decode=col(df, "decode").fillna("eager"), kv_cache=col(df, "kv_cache").fillna("native"),
                     prompt_tokens=col(df, "prompt_tokens").fillna(32).astype(int))


MIN_DECODE_SHARE = 0.2  # decode's share of its generations' energy below which its joules per token are not given
MAX_DECODE_BOUND = 0.25  # the counter's bound on joules per decode token, relative, above which they are not given


def with_decode_energy_checked(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with `decode_energy_share`: decode's share of the energy window's generations' energy, which tasks/energy
    measures as their energy less their prefills' (at the prefill loop's joules per token), and `decode_energy_bound`:
    the most NVML's counter updates can move joules per decode token, relative to them. The joules per decode token
    are left out (the Parquet keeps them) below MIN_DECODE_SHARE, where a 2% error in the prefills' energy is over 8%
    of decode's (on an H200 torchao-int4wo's 7B prefill took 15x fp16's, decode was 2-5% of its timed runs' energy,
    and its joules per decode token at 1024 x 8 read 0.21, 0.27 and 0.36 on three hosts; fp16: 0.40-0.44), and above
    MAX_DECODE_BOUND. Rows from before the energy window (2026-12-01c) have the timed runs' joules, however short
    those were, and no bound of their own: theirs is one 100 ms update at each window's mean power, relative to the
    decode share, (u / timed_s + u / prefill_s * (1 - share)) / share."""
    runs = numeric(df, "energy_runs").fillna(numeric(df, "repeats_done"))
    j_token = numeric(df, "energy_j_per_decode_token")
    decode_j = j_token * runs * numeric(df, "batch_size") * (numeric(df, "new_tokens") - 1)
    in_window = numeric(df, "energy_window_j")
    window_j = in_window.fillna(numeric(df, "energy_timed_j"))
    share = decode_j / window_j.where(window_j > 0)
    u = H200_ENERGY_UPDATE_S
    before_window = (u / numeric(df, "timed_s") + u / numeric(df, "energy_prefill_s") * (1 - share)) / share
    bound = (numeric(df, "energy_j_per_decode_token_bound") / j_token.where(j_token > 0)).fillna(
        before_window.where(in_window.isna()))
    out = df.assign(decode_energy_share=share, decode_energy_bound=bound)
    if "energy_j_per_decode_token" in out:
        out.loc[(share < MIN_DECODE_SHARE) | (bound > MAX_DECODE_BOUND), "energy_j_per_decode_token"] = None
    return out


CELL = ["model", "precision", "decode", "kv_cache", "kv_cache_options", "prompt_tokens", "new_tokens", "batch_size"]


def newest_per_cell(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell's coordinates (model, precision, decode, KV cache, prompt, new tokens, batch): its newest run.
    `report --all` can hold a cell twice (measured again under a later measurement version, or from two folders);
    figures, charts and verdicts use the newest, the table of every cell shows both."""
    keys = [c for c in CELL if c in df]
    coords = df[keys].astype(str)  # options are dicts or strings; rows from before a column existed have NaN
    newest = coords.assign(_run=col(df, "run_id").fillna("").astype(str)).sort_values("_run", kind="stable")
    return df.loc[newest.drop_duplicates(keys, keep="last").index].sort_index()


def headline_cell(df: pd.DataFrame) -> dict | None:
    """The cell the per-precision table shows: eager, native KV cache, the smallest batch and prompt, the longest
    generation among ok cells."""
    ok = df[(df.status == "ok") & (df.decode == "eager") & (df.kv_cache == "native")]
    if ok.empty:
        return None
    b = int(ok.batch_size.min())
    p = int(ok[ok.batch_size == b].prompt_tokens.min())
    n = int(ok[(ok.batch_size == b) & (ok.prompt_tokens == p)].new_tokens.max())
    return {"batch_size": b, "prompt_tokens": p, "new_tokens": n}


def at(df: pd.DataFrame, cell: dict, decode: str = "eager") -> pd.DataFrame:
    return df[(df.batch_size == cell["batch_size"]) & (df.prompt_tokens == cell["prompt_tokens"])
              & (df.new_tokens == cell["new_tokens"]) & (df.decode == decode) & (df.kv_cache == "native")]


def pareto(points: list[tuple[float, float, str]]) -> list[str]:
    """Labels on the frontier when both coordinates are better lower (e.g. KL and ms/token)."""
    front, best = [], float("inf")
    for x, y, label in sorted(points):
        if y < best:
            front.append(label)
            best = y
    return front


def frontier(points: dict[str, tuple[float, ...]]) -> list[str]:
    """Labels no other point beats on every coordinate (all better lower) and strictly on one."""
    out = []
    for p, a in points.items():
        dominated = any(all(x <= y for x, y in zip(b, a)) and any(x < y for x, y in zip(b, a))
                        for q, b in points.items() if q != p)
        if not dominated:
            out.append(p)
    return out


def precision_order(df: pd.DataFrame, baseline: str | None) -> list[str]:
    """The baseline, then by method (unquantized, weight-only from more bits to fewer, weight+activation)."""
    seen = list(dict.fromkeys(df.precision.dropna()))
    rest = sorted((p for p in seen if p != baseline), key=lambda p: method_rank(df[df.precision == p]))
    return ([baseline] if baseline in seen else []) + rest


def report_baseline(df: pd.DataFrame) -> str | None:
    """What a model's speeds and qualities are compared against: the baseline its rows name (each sweep's own); where
    merged sweeps name several that are among the rows (an fp16 sweep beside one of 4-bit methods alone, whose baseline
    is then its first precision), the first of them in method order, unquantized first; else the first precision."""
    order = precision_order(df, None)
    named = set(df.baseline.dropna()) & set(order) if "baseline" in df else set()
    return next((p for p in order if p in named), order[0] if order else None)


def colors(precisions: list[str]) -> dict[str, str]:
    return {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(dict.fromkeys(precisions))}


def _method(d: pd.DataFrame) -> tuple:
    scheme, bits = first(col(d, "quant_scheme")), first(col(d, "weight_bits_nominal"))
    if scheme is None:
        scheme, bits = LEGACY.get(first(col(d, "precision_name")), (None, None))
    return scheme, bits


def method_group(d: pd.DataFrame) -> str:
    """How a precision quantizes, in the report's groups: unquantized, weight-only N-bit, weight+activation N-bit."""
    scheme, bits = _method(d)
    if scheme in (None, "none") or bits is None:
        return "unquantized" if scheme == "none" else "–"
    return f"{scheme} {bits:g}-bit"


def method_rank(d: pd.DataFrame) -> tuple:
    scheme, bits = _method(d)
    return SCHEMES.get(scheme, 3), -(bits or 0)


def decode_runs(row) -> list[list[float]]:
    """Each timed run's decode gaps (ms), from the raw samples (new_tokens - 1 gaps a run, one run after another)."""
    samples, n = val(row.get("decode_ms_samples")), val(row.get("new_tokens"))
    if samples is None or not n or n < 2:
        return []
    samples, k = [float(s) for s in samples], int(n) - 1
    return [samples[i:i + k] for i in range(0, len(samples) - k + 1, k)]


def per_run_decode(row) -> list[float]:
    """Each timed run's mean decode gap (ms)."""
    return [sum(r) / len(r) for r in decode_runs(row)]
