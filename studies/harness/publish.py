"""Publish sweep output folders as a study's dataset: studies/<study>/cells.parquet (the newest row of each cell,
every column) and studies/<study>/study.json (what ran: each sweep's grid file, overrides, command, run ids, wall time,
GPUs, hosts and library versions), which `python -m orchestrator report studies/<study>` renders.

  python3 studies/harness/publish.py STUDY FOLDER [FOLDER ...] [--question "..."]

To add runs to a published study, name the study's folder among the folders (studies/STUDY): its rows and the
sources that wrote them stay beside the new ones. `--leave-out PRECISION@ENGINE WHY` keeps a precision's rows under
one engine out of the dataset (rows that do not measure what their name says); study.json lists them with the reason.

A cell is its coordinates (model, precision, engine, decode, KV cache, prompt, new tokens, batch) on one machine (its
GPU, or its host on CPU): measured there more than once (under a newer measurement version, say), its newest row is
kept; measured on several machines, each keeps its newest, so that every speed ratio the report gives is within one
machine. Grid files are copied into studies/<study>/grids/ when they are not there yet.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from reports.data import read_results  # noqa: E402
from common.schema import SCHEMA  # noqa: E402

CELL = ["model", "precision", "engine", "decode", "kv_cache", "kv_cache_options", "prompt_tokens", "new_tokens",
        "batch_size"]
VERSIONS = ["python_version", "torch_version", "transformers_version", "cuda_version", "driver_version",
            "bitsandbytes_version", "engine_version"]


def newest(df: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in CELL if c in df]
    where = df["gpu_uuid"].fillna(df["host"]) if "gpu_uuid" in df else df.get("host", "")
    coords = df[keys].astype(str).assign(_m=where.astype(str), _r=df["run_id"].astype(str),
                                         _t=df["ended_at"].astype(str) if "ended_at" in df else "")
    order = coords.sort_values(["_r", "_t"], kind="stable")
    return df.loc[order.drop_duplicates(keys + ["_m"], keep="last").index].sort_index()


def sources(folder: Path, rows: pd.DataFrame, published: list[dict]) -> list[dict]:
    """One entry per run of the folder that wrote rows (its manifest in runs/, or sweep.json for the last run): a
    folder resumed by sweeps of other overrides holds rows of each. The study's own folder (republished with new
    runs) keeps the entries it had, for the runs whose rows are still kept."""
    if (folder / "cells.parquet").is_file() and not (folder / "runs").is_dir():
        kept = rows.loc[rows["_kept"] & (rows["_folder"] == str(folder)), "run_id"].astype(str)
        return [dict(s, rows_kept=int((kept == str(s.get("run_id"))).sum()))
                for s in published if str(s.get("run_id")) in set(kept)]
    manifests = [json.loads(f.read_text()) for f in sorted((folder / "runs").glob("*.json"))] or (
        [json.loads((folder / "sweep.json").read_text())] if (folder / "sweep.json").is_file() else [{}])
    out = []
    for m in manifests:
        mine = rows[(rows["_folder"] == str(folder)) & (rows["run_id"].astype(str) == str(m.get("run_id")))]
        if len(manifests) > 1 and not len(mine):
            continue
        gpus = sorted({f"{n} {u}" for n, u in zip(mine.get("gpu_name", []), mine.get("gpu_uuid", []))
                       if isinstance(u, str)})
        out.append({"sweep": m.get("sweep"), "run_id": m.get("run_id"),
                    "grid_file": Path(m.get("grid_file") or "").name or None,
                    "overrides": m.get("overrides") or [], "started_at": m.get("started_at"), "wall_s": m.get("wall_s"),
                    "command": " ".join(["python -m orchestrator sweep", Path(m.get("grid_file") or "GRID").name]
                                        + [f"--set '{o}'" for o in m.get("overrides") or []]),
                    "rows_kept": int(mine["_kept"].sum()), "gpus": gpus,
                    "hosts": sorted(set(mine["host"].dropna())) if "host" in mine else []})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--question", default=None)
    ap.add_argument("--grids", nargs="*", default=[], help="grid files to copy into the study's grids/")
    ap.add_argument("--leave-out", nargs=2, action="append", default=[], metavar=("PRECISION@ENGINE", "WHY"),
                    help="leave these rows out of the dataset, for this reason (listed in study.json)")
    args = ap.parse_args()
    target = ROOT / "studies" / args.study
    target.mkdir(parents=True, exist_ok=True)
    frames = []
    for f in args.folders:
        df = read_results([Path(f)], [], every_row=True)
        if len(df):
            frames.append(df.assign(_folder=str(Path(f))))
    rows = pd.concat(frames, ignore_index=True)
    left_out = []
    for what, why in args.leave_out:
        precision, _, engine = what.partition("@")
        out = (rows["precision"] == precision) & (rows["engine"].fillna("hf") == (engine or "hf"))
        left_out.append({"precision": precision, "engine": engine or "hf", "rows": int(out.sum()), "why": why})
        rows = rows[~out]
    keep = newest(rows)
    rows["_kept"] = rows.index.isin(keep.index)
    names = [n for n in SCHEMA.names if n in keep]
    table = pa.Table.from_pandas(keep[names], schema=pa.schema([SCHEMA.field(n) for n in names]),
                                 preserve_index=False)
    pq.write_table(table, target / "cells.parquet", compression="zstd", compression_level=19,
                   write_statistics=False)
    manifest = json.loads((target / "study.json").read_text()) if (target / "study.json").is_file() else {}
    published = manifest.get("sources") or []
    if left_out:
        manifest["left_out"] = (manifest.get("left_out") or []) + left_out
    manifest.update(study=args.study, question=args.question or manifest.get("question"),
                    cells=len(keep), sources=[s for f in args.folders for s in sources(Path(f), rows, published)],
                    versions={v: sorted(map(str, set(keep[v].dropna()))) for v in VERSIONS if v in keep},
                    gpus=sorted(set(keep["gpu_name"].dropna())) if "gpu_name" in keep else [])
    (target / "study.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    for g in args.grids:
        (target / "grids").mkdir(exist_ok=True)
        if not (target / "grids" / Path(g).name).exists():
            shutil.copy(g, target / "grids" / Path(g).name)
    print(f"{target}: {len(keep)} cells from {len(rows)} rows, {(target / 'cells.parquet').stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
