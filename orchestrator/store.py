"""The results store: a Parquet dataset at `<output>/cells/`, one file per cell named by its key, each written under
a temporary name and renamed, so a crash never leaves half a file and `pandas.read_parquet(<output>/cells)` always
reads whole rows. The folder is a cache of cells: rows of cells that the current grid does not ask for stay there and
are used again whenever a grid asks for them (`sweep.json` lists the latest grid's cells, which the report shows by
default). Nothing is deleted or overwritten: a row replaced by a rerun moves to `<output>/history/<run_id>/`.

The output folder is untrusted: every write goes through common.untrusted (no link followed, none written through), and a
file in `cells/` is counted only if it is the row of the cell its name claims (common.schema.row_problem); any other
is moved to `<output>/set-aside/<run_id>/` and named.
"""
from __future__ import annotations

import io
import json
import os
import stat
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.untrusted import BadInput, kind_of, open_folder, replace_file, subfolder
from common.schema import NAMES, QUALITY_COLUMNS, SCHEMA, row_problem

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


def row_bytes(row: dict) -> bytes:
    buf = io.BytesIO()
    # no statistics: a row's min and max are the row (13 of a row file's 59 KB)
    pq.write_table(row_table([row]), buf, write_statistics=False)
    return buf.getvalue()


class StoreError(Exception):
    """The results folder cannot be written (full disk, read-only): the sweep stops cleanly, rows so far intact."""


class Store:
    def __init__(self, output: str | Path, run_id: str):
        self.root = Path(output)
        self.run_id = run_id
        self.cells = self.root / "cells"
        self._fd = open_folder(self.root)
        self._cells_fd = subfolder(self._fd, "cells", self.root)

    def close(self) -> None:
        for fd in (self._cells_fd, self._fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def path(self, key: str) -> Path:
        return self.cells / f"{key}.parquet"

    def _move_out(self, name: str, to: str) -> Path:
        """Move cells/<name> into <to>/<run_id>/ under a name no file there has (a cell replaced twice in one run
        keeps both earlier rows)."""
        top = subfolder(self._fd, to, self.root)
        try:
            run = subfolder(top, self.run_id, self.root / to)
        finally:
            os.close(top)
        try:
            stem, suffix = os.path.splitext(name)
            target, n = name, 1
            while _exists(run, target):
                target, n = f"{stem}.{n}{suffix}", n + 1
            os.rename(name, target, src_dir_fd=self._cells_fd, dst_dir_fd=run)
        finally:
            os.close(run)
        return self.root / to / self.run_id / target

    def write(self, row: dict) -> None:
        """Write one row file (under a temporary name, then renamed); a row it replaces moves to history/.
        StoreError when the folder cannot be written."""
        name = f"{row['cell_key']}.parquet"
        data = row_bytes(row)  # a row that does not fit the schema is a bug: KeyError, not a StoreError
        try:
            if _exists(self._cells_fd, name):
                self._move_out(name, "history")
            replace_file(self._cells_fd, name, data, self.cells)
        except BadInput as e:
            raise StoreError(str(e)) from None
        except OSError as e:
            raise StoreError(f"cannot write results to {self.cells} ({e.strerror or e})") from None

    def set_aside(self) -> list[str]:
        """Move every file in cells/ that is not the row of the cell its name claims into set-aside/<run_id>/;
        returns 'name: why' for each."""
        out = []
        for name, problem in foreign_rows(self.root).items():
            try:
                self._move_out(name, "set-aside")
            except (OSError, BadInput) as e:
                raise StoreError(f"cannot set aside {self.cells / name} ({getattr(e, 'strerror', None) or e})")
            out.append(f"{name}: {problem}")
        return out

    def write_manifest(self, manifest: dict, latest: bool = True) -> None:
        """`runs/<run_id>.json` keeps every run's manifest (a resumed sweep's earlier runs keep their wall time, model
        loads and retries); `sweep.json` (when `latest`) describes the latest run that planned its cells."""
        text = json.dumps(manifest, indent=2, default=str).encode()
        try:
            runs = subfolder(self._fd, "runs", self.root)
            try:
                replace_file(runs, f"{self.run_id}.json", text, self.root / "runs")
            finally:
                os.close(runs)
            if latest:
                replace_file(self._fd, "sweep.json", text, self.root)
        except BadInput as e:
            raise StoreError(str(e)) from None
        except OSError as e:
            raise StoreError(f"cannot write the run's manifest to {self.root} ({e.strerror or e})") from None


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def _entries(output: str | Path):
    """(name, path, why not a row file or None) of each *.parquet entry directly in <output>/cells: a link or a
    folder there is never read (nor followed), only named."""
    cells = Path(output) / "cells"
    if cells.is_symlink() or not cells.is_dir():
        return
    for entry in os.scandir(cells):
        if entry.name.endswith(".parquet"):
            mode = entry.stat(follow_symlinks=False).st_mode
            yield entry.name, Path(entry.path), None if stat.S_ISREG(mode) else f"{kind_of(mode)}, not a file"


def _row_files(output: str | Path):
    """(name, path) of each regular *.parquet file directly in <output>/cells."""
    for name, path, problem in _entries(output):
        if problem is None:
            yield name, path


def read_row(path: Path) -> tuple[pa.Table | None, str | None]:
    """(the row, None), or (None, why it is not the row of the cell its file name claims)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        return None, f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    problem = row_problem(path.name.removesuffix(".parquet"), table)
    return (None, problem) if problem else (table, None)


def foreign_rows(output: str | Path) -> dict[str, str]:
    """name -> why, for the entries in cells/ that are not their cell's row (unreadable ones, links included)."""
    out = {}
    for name, path, problem in _entries(output):
        out[name] = problem or read_row(path)[1]
    return {k: v for k, v in out.items() if v}


def cell_statuses(output: str | Path) -> dict[str, str]:
    """cell key -> status of every row in an output folder that is its cell's row (empty when there is none)."""
    out = {}
    for name, path in _row_files(output):
        table, problem = read_row(path)
        if table is not None:
            out[name.removesuffix(".parquet")] = table.column("status")[0].as_py()
    return out


def known_quality(output: str | Path) -> dict[str, dict]:
    """quality_key -> the quality columns (perplexity, its windows and interval, the distance) of rows in an output
    folder that measured them: a unit with the same key reuses them instead of measuring again."""
    out: dict[str, dict] = {}
    for _, path in _row_files(output):
        table, problem = read_row(path)
        if table is None:
            continue
        cols = [c for c in ("quality_key", *QUALITY_COLUMNS) if c in table.column_names]
        if "quality_key" not in cols or "perplexity" not in cols:
            continue
        row = table.select(cols).to_pylist()[0]
        if row["quality_key"] and row["perplexity"] is not None and not row.get("distance_missing"):
            out.setdefault(row.pop("quality_key"), row)
    return out
