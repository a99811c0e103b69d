"""Reading result folders and studies (untrusted: every file checked, every text made plain, older rows upgraded by
reports.migrate), and the small facts the report's rooms share: variants (a precision on an engine), their order and
colours, method labels, the baseline, the newest row of each cell. pandas and pyarrow only: no torch here."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.untrusted import MANIFEST_CAP, BadInput, parse_json, plain, read_regular_file
from reports.migrate import col, numeric, upgrade
from common.schema import row_problem, study_problem

FAILED = ("error", "oom", "timeout")
SCHEMES = {"none": 0, "weight-only": 1, "weight+activation": 2}
ENGINE_NAMES = {"hf": "transformers", "vllm": "vLLM"}
# one colour per precision in every chart: tab20, then tab20b and tab20c, in the order precisions first appear
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3", "#8ca252",
           "#bd9e39", "#ad494a", "#a55194", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#6baed6"]
BROKEN_RATIO = 10.0  # perplexity more than this times the baseline's: broken, named, kept out of the charts' scales


def manifest(folder: Path) -> dict:
    """A results folder's sweep.json, or a study's study.json (capped, of bounded depth); {} where there is none or
    it cannot be read."""
    for name in ("sweep.json", "study.json"):
        if (Path(folder) / name).is_file():
            try:
                data = parse_json(read_regular_file(Path(folder) / name, MANIFEST_CAP, name), name, str(folder))
            except BadInput:
                return {}
            return data if isinstance(data, dict) else {}
    return {}


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
        study = d / "cells.parquet"
        if study.is_file() and not study.is_symlink():  # a study: one file, the newest row of each cell
            try:
                table = pq.read_table(study)
                problem = study_problem(table)
            except (OSError, pa.ArrowException) as e:
                problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            if problem is None:
                tables.append(table)
            elif unreadable is not None:
                unreadable.append(f"{study}: {problem}")
            continue
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
        return pd.DataFrame(columns=["cell_key", "status", "model", "precision", "variant", "engine"])
    df = upgrade(as_plain_text(pa.concat_tables(tables, promote_options="default").to_pandas()))
    return df.assign(variant=[variant(p, e) for p, e in zip(df.precision, df.engine)])


def variant(precision, engine) -> str:
    """What the report compares: a precision on an engine (transformers' own name is the precision's)."""
    return str(precision) if engine in (None, "hf") else f"{precision} · {ENGINE_NAMES.get(engine, engine)}"


def as_plain_text(df: pd.DataFrame) -> pd.DataFrame:
    """Every text column with its control characters escaped (common.untrusted.plain): rows come from a results folder,
    which is untrusted; tracebacks and messages keep their newlines."""
    out = df.copy()
    for name in out.columns:
        if out[name].dtype == object or pd.api.types.is_string_dtype(out[name].dtype):
            keep = name in ("traceback", "error_message", "ppl_error", "ppl_kv_error")
            out[name] = out[name].map(lambda v: plain(v, lines=keep) if isinstance(v, str) else v)
    return out


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


MIN_DECODE_SHARE = 0.2  # decode's share of its generations' energy below which its joules per token are not given
MAX_DECODE_BOUND = 0.25  # the counter's bound on joules per decode token, relative, above which they are not given


def with_decode_energy(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with `decode_energy_share`: decode's share of the energy window's generations' energy (tasks.energy
    measures decode's as the generations' less their prefills', at the prefill loop's joules per token), and
    `decode_energy_bound`: the most NVML's counter updates can move joules per decode token, relative to them. The
    joules per decode token are left out (the Parquet keeps them) below MIN_DECODE_SHARE, where a 2% error in the
    prefills' energy is over 8% of decode's, and above MAX_DECODE_BOUND."""
    runs = numeric(df, "energy_runs").fillna(numeric(df, "repeats_done"))
    j_token = numeric(df, "energy_j_per_decode_token")
    decode_j = j_token * runs * numeric(df, "batch_size") * (numeric(df, "new_tokens") - 1)
    window_j = numeric(df, "energy_window_j")
    share = decode_j / window_j.where(window_j > 0)
    bound = numeric(df, "energy_j_per_decode_token_bound") / j_token.where(j_token > 0)
    out = df.assign(decode_energy_share=share, decode_energy_bound=bound)
    if "energy_j_per_decode_token" in out:
        out.loc[(share < MIN_DECODE_SHARE) | (bound > MAX_DECODE_BOUND), "energy_j_per_decode_token"] = None
    return out


CELL = ["model", "variant", "decode", "kv_cache", "kv_cache_options", "prompt_tokens", "new_tokens", "batch_size"]


def newest_per_cell(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell's coordinates (model, variant, decode, KV cache, prompt, new tokens, batch): its newest run.
    `report --all` can hold a cell twice (measured again, or from two folders); figures, charts and verdicts use the
    newest, the table of every cell shows both."""
    keys = [c for c in CELL if c in df]
    coords = df[keys].astype(str)  # options are dicts or strings
    run = col(df, "run_id").astype(object).fillna("").astype(str)  # object first: an all-missing column is floats
    newest = coords.assign(_run=run).sort_values("_run", kind="stable")
    return df.loc[newest.drop_duplicates(keys, keep="last").index].sort_index()


def pareto(points: list[tuple[float, float, str]]) -> list[str]:
    """Labels on the frontier when both coordinates are better lower (e.g. KL and ms/token)."""
    front, best = [], float("inf")
    for x, y, label in sorted(points):
        if y < best:
            front.append(label)
            best = y
    return front


def dominated_by(points: dict[str, tuple[float, ...]]) -> dict[str, str]:
    """label -> a label that is at least as good on every coordinate (all better lower) and better on one."""
    out = {}
    for p, a in points.items():
        for q, b in points.items():
            if q != p and all(x <= y for x, y in zip(b, a)) and any(x < y for x, y in zip(b, a)):
                out[p] = q
                break
    return out


def precision_order(df: pd.DataFrame, baseline: str | None) -> list[str]:
    """Variants: the baseline, then by engine, then by method (unquantized, weight-only from more bits to fewer,
    weight and activation)."""
    seen = list(dict.fromkeys(df.variant.dropna()))
    engines = {v: i for i, v in enumerate(dict.fromkeys(col(df, "engine").fillna("hf")))}
    rest = sorted((p for p in seen if p != baseline),
                  key=lambda p: (engines.get(first(col(df[df.variant == p], "engine")) or "hf", 0),
                                 method_rank(df[df.variant == p])))
    return ([baseline] if baseline in seen else []) + rest


def report_baseline(df: pd.DataFrame) -> str | None:
    """What a model's other variants are compared against: the baseline precision its rows name, on the first engine
    that ran it; where merged sweeps name several baselines, the first of them in method order (unquantized first);
    else the first variant."""
    if not len(df):
        return None
    named = set(col(df, "baseline").dropna())
    hf = df[col(df, "engine").fillna("hf") == "hf"]
    for rows in (hf, df):
        candidates = rows[rows.precision.isin(named)] if len(named) else rows.iloc[0:0]
        if len(candidates):
            order = precision_order(candidates, None)
            if order:
                return order[0]
    order = precision_order(df, None)
    return order[0] if order else None


def engine_baseline(df: pd.DataFrame, baseline: str | None, engine: str) -> str | None:
    """The baseline precision on `engine`, where that engine ran it (its own variants are compared against it for
    speed); else the report's baseline."""
    if baseline is None:
        return None
    precision = first(col(df[df.variant == baseline], "precision"))
    mine = variant(precision, engine)
    return mine if (df.variant == mine).any() else baseline


def colors(precisions: list[str]) -> dict[str, str]:
    return {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(dict.fromkeys(precisions))}


def _method(d: pd.DataFrame) -> tuple:
    return first(col(d, "quant_scheme")), first(col(d, "weight_bits_nominal"))


def method_group(d: pd.DataFrame) -> str:
    """What a variant quantizes, in the report's words: unquantized; weights N-bit; weights and activations N-bit."""
    scheme, bits = _method(d)
    if scheme in (None, "none") or bits is None:
        return "unquantized" if scheme == "none" else "–"
    what = {"weight-only": "weights", "weight+activation": "weights and activations"}.get(scheme, scheme)
    return f"{what} {bits:g}-bit"


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
