"""Reading result folders and the numbers the report shows. pandas and pyarrow only: no torch here."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FAILED = ("error", "oom", "timeout")


def latest_cells(folder: Path) -> set[str] | None:
    """The cell keys of the latest sweep's grid in an output folder (its sweep.json), None where it does not say."""
    try:
        keys = json.loads((folder / "sweep.json").read_text()).get("cell_keys")
    except (OSError, ValueError):
        return None
    return set(keys) if isinstance(keys, list) else None


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
            try:
                tables.append(pq.read_table(f))
            except (OSError, pa.ArrowException) as e:
                if unreadable is not None:
                    unreadable.append(f"{f}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if not tables:
        return pd.DataFrame(columns=["cell_key", "status", "model", "precision"])
    return pa.concat_tables(tables, promote_options="default").to_pandas()


def col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def first(series: pd.Series):
    s = series.dropna()
    return s.iloc[0] if len(s) else None


def headline_cell(df: pd.DataFrame) -> tuple[int, int] | None:
    """The (new_tokens, batch_size) used for the per-precision table: smallest batch, longest generation."""
    ok = df[df.status == "ok"]
    if ok.empty:
        return None
    b = int(ok.batch_size.min())
    n = int(ok[ok.batch_size == b].new_tokens.max())
    return n, b


def pareto(points: list[tuple[float, float, str]]) -> list[str]:
    """Labels on the frontier when both coordinates are better lower (e.g. perplexity and ms/token)."""
    front, best = [], float("inf")
    for x, y, label in sorted(points):
        if y < best:
            front.append(label)
            best = y
    return front


def precision_order(df: pd.DataFrame, baseline: str | None) -> list[str]:
    seen = list(dict.fromkeys(df.precision.dropna()))
    return ([baseline] if baseline in seen else []) + [p for p in seen if p != baseline]
