"""Where a GPU run stands: per sweep folder, cells by status, and each failed cell's reason (bench/gpu.sh phaseE)."""
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

COLS = ["model", "precision", "new_tokens", "batch_size", "decode", "kv_cache", "status", "error_message",
        "decode_ms_per_token", "perplexity", "peak_bytes"]

for folder in sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_dir()):
    rows = []
    for f in (folder / "cells").glob("*.parquet"):
        t = pq.read_table(f)
        rows.append({c: (t.column(c)[0].as_py() if c in t.column_names else None) for c in COLS})
    print(f"{folder.name}: {dict(Counter(r['status'] for r in rows))}")
    for r in sorted(rows, key=lambda r: (r["model"], r["precision"], r["decode"] or "", r["kv_cache"] or "",
                                         r["new_tokens"], r["batch_size"])):
        what = (f"{r['decode_ms_per_token']:.1f} ms/tok, ppl {r['perplexity']}, peak {(r['peak_bytes'] or 0) / 1e9:.2f} GB"
                if r["status"] == "ok" else (r["error_message"] or "")[:160].replace("\n", " "))
        print(f"  {r['status']:7} {r['model']} {r['precision']} {r['decode']} {r['kv_cache']} "
              f"{r['new_tokens']}x{r['batch_size']}: {what}")
