"""The Ray driver on a local Ray with fake GPUs: pinning, streaming, resume, failure isolation, retries, timeouts."""
import json
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import ray

from cluster.connect import init_embedded
from orchestrator import sweep
from orchestrator.store import cell_statuses

RUNNER = "tests.scripted:run_unit"


@pytest.fixture(scope="module")
def local_ray():
    # two fake GPUs that say they are T4s (compute capability 7.5), as Ray labels real ones
    init_embedded(num_cpus=4, num_gpus=2, resources={"accelerator_type:T4": 1}, log_to_driver=False)
    yield
    ray.shutdown()


def grid(tmp_path, labels, new_tokens="[1, 2]", extra=""):
    models = "\n".join(f"  - synthetic: {{family: opt, hidden_size: 8, layers: 1, heads: 1, ffn: 8, vocab: {i + 8}}}"
                       f"\n    label: {lab}" for i, lab in enumerate(labels))
    f = tmp_path / "g.yaml"
    f.write_text(textwrap.dedent(f"""
        name: drv
        models:
        {{models}}
        precisions: [fp16]
        generation: {{{{new_tokens: {new_tokens}, batch_sizes: [1]}}}}
        perplexity: false
        resources: {{{{gpus_per_task: 1, cpus_per_task: 0.5, timeout_s: 30, retries: 1}}}}
    """).format(models=models) + extra)
    return f


def rows(out):
    return pd.read_parquet(out / "cells")


def test_units_pinned_to_distinct_gpus(local_ray, tmp_path):
    out = tmp_path / "out"
    code = sweep.run(str(grid(tmp_path, ["sleep-1.5", "sleep-1.51"])), [], output=str(out), runner=RUNNER, live=False)
    assert code == 0
    df = rows(out)
    assert len(df) == 4 and set(df.status) == {"ok"}
    # the two units overlapped in time and Ray gave each its own GPU
    spans = df.groupby("model").agg(start=("started_at", "min"), end=("ended_at", "max"),
                                    gpu=("cuda_visible_devices", "first"), pid=("worker_pid", "first"))
    a, b = spans.iloc[0], spans.iloc[1]
    assert a.start < b.end and b.start < a.end
    assert {a.gpu, b.gpu} == {"0", "1"}
    assert a.pid != b.pid


def test_resume_skips_ok_cells_and_force_reruns(local_ray, tmp_path, capsys):
    out = tmp_path / "out"
    g = str(grid(tmp_path, ["sleep-0.01"]))
    assert sweep.run(g, [], output=str(out), runner=RUNNER, live=False) == 0
    first = rows(out).set_index("cell_key").run_id
    assert sweep.run(g, [], output=str(out), runner=RUNNER, live=False) == 0
    assert "0 to run (2 already ok" in capsys.readouterr().out
    assert (rows(out).set_index("cell_key").run_id == first).all()
    # a changed configuration gets new keys; the folder is a cache of cells: the earlier grid's rows stay, and going
    # back to it measures nothing again
    assert sweep.run(g, ["generation.new_tokens=[1, 3]"], output=str(out), runner=RUNNER, live=False) == 0
    assert "1 to run (1 already ok" in capsys.readouterr().out
    df = rows(out)
    assert sorted(df.new_tokens) == [1, 2, 3] and set(first.index) <= set(df.cell_key)
    assert not (out / "history").exists()
    assert sweep.run(g, [], output=str(out), runner=RUNNER, live=False) == 0
    assert "0 to run (2 already ok" in capsys.readouterr().out
    assert sweep.run(g, ["generation.new_tokens=[1, 3]"], output=str(out), force=True, runner=RUNNER,
                     live=False) == 0
    df = rows(out)
    forced = df[df.new_tokens.isin([1, 3])]
    assert not set(forced.run_id) & set(first) and len(list((out / "history").rglob("*.parquet"))) == 2
    # the report shows the latest grid's cells; --all every row kept
    from reports.data import read_results

    assert sorted(read_results([out], every_row=False).new_tokens) == [1, 3]
    assert sorted(read_results([out]).new_tokens) == [1, 2, 3]


def test_raise_and_kill_become_failure_rows_while_others_finish(local_ray, tmp_path):
    out = tmp_path / "out"
    g = grid(tmp_path, ["raise", "kill-always", "kill-once", "sleep-0.01"], new_tokens="[1, 2, 3]")
    code = sweep.run(str(g), [], output=str(out), runner=RUNNER, live=False)
    assert code == 1
    df = rows(out).set_index(["model", "new_tokens"]).sort_index()
    st = df.status
    # the unit that raised: its first cell kept, the rest failed with the exception and traceback
    assert st.loc[("raise", 1)] == "ok" and st.loc[("raise", 2)] == "error" and st.loc[("raise", 3)] == "error"
    assert df.loc[("raise", 2)].error_type == "ValueError" and "scripted failure" in df.loc[("raise", 2)].traceback
    # a worker that dies after one cell on every attempt: each attempt keeps one cell, the last cell fails
    assert list(st.loc["kill-always"]) == ["ok", "ok", "error"]
    assert list(df.loc["kill-always"].attempt) == [1, 2, 2]
    assert df.loc[("kill-always", 3)].error_type == "UnitProcessDied"
    assert "crashed on attempt 2 of 2" in df.loc[("kill-always", 3)].error_message
    assert "ended before its last row: exit code 1" in df.loc[("kill-always", 3)].error_message
    # each attempt ran in a process of its own
    assert df.loc["kill-always"].worker_pid.nunique() == 2
    # killed once, then retried with the unfinished cells only
    assert list(st.loc["kill-once"]) == ["ok", "ok", "ok"]
    assert list(df.loc["kill-once"].attempt) == [1, 2, 2]
    assert list(st.loc["sleep-0.01"]) == ["ok", "ok", "ok"]
    # rerunning retries only what failed
    assert cell_statuses(out) and sum(s != "ok" for s in cell_statuses(out).values()) == 3


def test_timeout_cancels_the_unit(local_ray, tmp_path):
    out = tmp_path / "out"
    g = grid(tmp_path, ["hang", "sleep-0.01"])
    code = sweep.run(str(g), ["resources.timeout_s=3"], output=str(out), runner=RUNNER, live=False)
    assert code == 1
    df = rows(out).set_index(["model", "new_tokens"])
    assert list(df.loc["hang"].status) == ["timeout", "timeout"]
    assert "timeout_s = 3" in df.loc[("hang", 1)].error_message
    assert set(df.loc["sleep-0.01"].status) == {"ok"}
    # cancelling the task killed its Ray worker; the unit's process (forked from the worker's fork server) went too
    pid = int(Path(tempfile.gettempdir(), f"scripted-hang-{df.loc[('hang', 1)].cell_key}.pid").read_text())
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), f"unit process {pid} outlived its cancelled task"


def test_precisions_the_gpus_cannot_run_are_skipped_before_start(local_ray, tmp_path):
    """float8 needs compute capability 8.9 and bf16 8.0; the cluster's GPUs are T4s (7.5): those units never start,
    their cells are `skipped` rows with the reason, and the rest run."""
    out = tmp_path / "out"
    g = grid(tmp_path, ["sleep-0.01"]).read_text().replace(
        "precisions: [fp16]", "precisions: [fp16, {name: torchao-fp8wo, compute_dtype: fp16}, bf16]")
    (tmp_path / "g.yaml").write_text(g)
    code = sweep.run(str(tmp_path / "g.yaml"), [], output=str(out), runner=RUNNER, live=False)
    assert code == 0
    df = rows(out).set_index(["precision_name", "new_tokens"])
    assert set(df.loc["fp16"].status) == {"ok"}
    assert set(df.loc["torchao-fp8wo"].status) == {"skipped"} and set(df.loc["bf16"].status) == {"skipped"}
    assert "needs compute capability 8.9 or newer; the GPU has 7.5 (T4)" in df.loc[("torchao-fp8wo", 1)].error_message
    assert "bfloat16" in df.loc[("bf16", 1)].error_message
    assert df.loc["torchao-fp8wo"].worker_pid.isna().all()  # no process ever ran them
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["model_loads"] == 1 and len(manifest["skipped_before_start"]) == 2
