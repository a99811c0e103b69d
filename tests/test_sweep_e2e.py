"""End to end through the CLI, as a user runs it: a tiny synthetic model on an embedded local Ray (CPU only here),
Parquet rows, sweep.json, report.html; then a rerun that resumes."""
import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from tests.conftest import ROOT, TINY_LLAMA, TINY_OPT

GRID = textwrap.dedent(f"""
    name: e2e
    models:
      - synthetic: {json.dumps(TINY_LLAMA)}
        label: tiny-llama
      - synthetic: {json.dumps(TINY_OPT)}
        label: tiny-opt
    precisions: [fp32, {{name: nf4, compute_dtype: fp32}}]
    baseline: fp32
    generation: {{new_tokens: [4, 8], batch_sizes: [1, 2], prompt_tokens: 8, warmup: 1, repeats: 2}}
    perplexity: false
    resources: {{gpus_per_task: 1, cpus_per_task: 1}}
""")


def sweep(tmp_path, *args):
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(tmp_path / "grid.yaml"),
                           "--output", str(tmp_path / "out"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_sweep_end_to_end_and_resume(tmp_path):
    (tmp_path / "grid.yaml").write_text(GRID)
    r = sweep(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "has no GPUs; units run on CPU" in r.stdout
    assert "4 model loads for 4 units" in r.stdout
    out = tmp_path / "out"
    df = pd.read_parquet(out / "cells")
    assert len(df) == 2 * 2 * 2 * 2 and set(df.status) == {"ok"}
    assert df.cell_key.is_unique and (df.model_loads_in_worker == 1).all()
    assert df.groupby(["model", "precision"]).worker_pid.nunique().eq(1).all()  # one worker per unit
    assert df.worker_pid.nunique() == 4                                         # and a fresh one for each
    assert (df.gpus_per_task == 0).all() and (df.device == "cpu").all()
    assert (df.host_load_1m >= 0).all() and df.host_load_1m.notna().all()  # what else ran on the host's CPUs
    # and on the unit's own CPUs while its runs were timed (empty where they took under 0.25 s together)
    busy = df.dropna(subset=["host_other_busy_cpus"])
    assert (df.host_cpus >= 1).all() and df.host_other_busy_cpus_max.notna().eq(df.host_other_busy_cpus.notna()).all()
    assert ((0 <= busy.host_other_busy_cpus) & (busy.host_other_busy_cpus <= busy.host_other_busy_cpus_max)
            & (busy.host_other_busy_cpus_max <= busy.host_cpus)).all()
    assert (df.host_probe_before_ms > 0).all() and (df.host_probe_after_ms > 0).all()  # the host's pace, each cell
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["model_loads"] == 4 and manifest["cells"] == 16
    # where each unit's time went: its own walls in the rows, the worker's and the driver's in sweep.json
    parts = manifest["per_unit_parts"]
    assert len(parts) == 4 and all(p["fork_s"] >= 0 and p["exit_s"] >= 0 and p["reference_put_s"] == 0
                                   and p["driver_started_at"] < p["driver_ended_at"] for p in parts.values())
    assert (df.load_wall_s >= df.load_s).all() and (df.import_s >= 0).all() and df.quality_wall_s.notna().all()
    assert (df.unit_started_at <= df.started_at).all()
    for key, p in parts.items():
        unit = df[df.unit_id == key.split("#")[0]]
        assert p["driver_started_at"] - 60 < unit.unit_started_at.iloc[0].timestamp() < p["driver_ended_at"]
        assert unit.ended_at.max().timestamp() <= p["driver_ended_at"]
    html = (out / "report.html").read_text()
    assert "tiny-llama" in html and "<svg" in html and "host probe ms" in html
    # options that move numbers (the allocator's: whatever this process's environment says; a gptq test before this
    # one leaves PYTORCH_ALLOC_CONF set, as gptqmodel's import would)
    assert "attention backends allowed" in html and " · allocator " in html
    r = sweep(tmp_path)
    assert r.returncode == 0 and "nothing to do: all 16 cells are already ok" in r.stdout
    assert pd.read_parquet(out / "cells").run_id.nunique() == 1
    # each run keeps its own manifest; sweep.json is the latest run that measured
    runs = sorted(json.loads(p.read_text())["cells_to_run"] for p in (out / "runs").glob("*.json"))
    assert runs == [0, 16] and json.loads((out / "sweep.json").read_text())["cells_to_run"] == 16


def test_offline_without_wikitext_stops_at_once(tmp_path):
    (tmp_path / "grid.yaml").write_text(GRID.replace("perplexity: false", "perplexity: {max_windows: 1}"))
    env = {k: v for k, v in os.environ.items() if k != "WIKITEXT2_PATH"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(tmp_path / "grid.yaml")],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "WIKITEXT2_PATH" in r.stderr and "perplexity.path" in r.stderr and "Traceback" not in r.stderr


def test_wrong_wikitext_file_is_refused(tmp_path):
    (tmp_path / "grid.yaml").write_text(GRID.replace("perplexity: false", "perplexity: {path: other.raw}"))
    (tmp_path / "other.raw").write_text("not wikitext\n")
    r = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(tmp_path / "grid.yaml")],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is not the WikiText-2 raw test split" in r.stderr
