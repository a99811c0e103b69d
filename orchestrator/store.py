"""The results store: a Parquet dataset at `<output>/cells/`, one file per cell named by its key, each written under
a temporary name and renamed, so a crash never leaves half a file and `pandas.read_parquet(<output>/cells)` always
reads whole rows. The folder is a cache of cells: rows of cells that the current grid does not ask for stay there and
are used again whenever a grid asks for them (`sweep.json` lists the latest grid's cells, which the report shows by
default). Nothing is deleted or overwritten: a row replaced by a rerun moves to `<output>/history/<run_id>/`.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from spec.schema import NAMES, QUALITY_COLUMNS, SCHEMA


_TIMES = {f.name for f in SCHEMA if pa.types.is_timestamp(f.type)}


def _value(name: str, v):
    if v is not None and name in _TIMES and isinstance(v, str):
        return datetime.fromisoformat(v)
    return v


def row_table(rows: list[dict]) -> pa.Table:
    unknown = set().union(*rows) - set(NAMES)
    if unknown:
        raise KeyError(f"columns not in the schema: {sorted(unknown)}")
    return pa.Table.from_pylist([{n: _value(n, r.get(n)) for n in NAMES} for r in rows], schema=SCHEMA)


class StoreError(Exception):
    """The results folder cannot be written (full disk, read-only): the sweep stops cleanly, rows so far intact."""


class Store:
    def __init__(self, output: str | Path, run_id: str):
        self.root = Path(output)
        self.run_id = run_id
        self.cells = self.root / "cells"
        self.history = self.root / "history" / run_id
        self.cells.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.cells / f"{key}.parquet"

    def _retire(self, path: Path) -> None:
        """Move a row file into history/<run_id>/ under a name no other file there has: a cell replaced twice in one
        run keeps both earlier rows."""
        self.history.mkdir(parents=True, exist_ok=True)
        target, n = self.history / path.name, 1
        while target.exists():
            target = self.history / f"{path.stem}.{n}{path.suffix}"
            n += 1
        os.replace(path, target)

    def write(self, row: dict) -> None:
        """Write one row file (under a temporary name, then renamed). StoreError when the folder cannot be written."""
        target = self.path(row["cell_key"])
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        table = row_table([row])  # a row that does not fit the schema is a bug: KeyError, not a StoreError
        try:
            pq.write_table(table, tmp, write_statistics=False)  # a row's min and max are the row: 13 of a
            # row file's 59 KB (203 columns), every file uploaded to the GPU host with the published results
            if target.exists():
                self._retire(target)
            os.replace(tmp, target)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise StoreError(f"cannot write results to {self.cells} ({e.strerror or e})") from None

    def statuses(self) -> dict[str, str]:
        return cell_statuses(self.root)

    def write_manifest(self, manifest: dict) -> None:
        """`sweep.json` describes the latest run; `runs/<run_id>.json` keeps every run's (a resumed sweep's earlier
        runs keep their wall time, model loads and retries)."""
        text = json.dumps(manifest, indent=2, default=str)
        try:
            (self.root / "runs").mkdir(parents=True, exist_ok=True)
            for target in (self.root / "runs" / f"{self.run_id}.json", self.root / "sweep.json"):
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_text(text)
                os.replace(tmp, target)
        except OSError as e:
            raise StoreError(f"cannot write the run's manifest to {self.root} ({e.strerror or e})") from None


def cell_statuses(output: str | Path) -> dict[str, str]:
    """cell key -> status of every row in an output folder (empty when there is none)."""
    out = {}
    for f in (Path(output) / "cells").glob("*.parquet"):
        try:
            out[f.stem] = pq.read_table(f, columns=["status"]).column(0)[0].as_py()
        except Exception:  # unreadable: treat as not done
            continue
    return out


def known_quality(output: str | Path) -> dict[str, dict]:
    """quality_key -> the quality columns (perplexity, its windows and interval, the distance) of rows in an output
    folder that measured them: a unit with the same key reuses them instead of measuring again."""
    out: dict[str, dict] = {}
    for f in (Path(output) / "cells").glob("*.parquet"):
        try:
            schema = pq.read_schema(f)
            cols = [c for c in ("quality_key", *QUALITY_COLUMNS) if c in schema.names]
            if "quality_key" not in cols or "perplexity" not in cols:
                continue
            row = pq.read_table(f, columns=cols).to_pylist()[0]
        except Exception:  # unreadable: measured again
            continue
        if row["quality_key"] and row["perplexity"] is not None and not row.get("distance_missing"):
            out.setdefault(row.pop("quality_key"), row)
    return out
