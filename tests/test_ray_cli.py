"""The README's cluster commands on this machine: `ray start --head`, `ray status`, a sweep with `--address`, and
`ray job submit` of the same command (Ray 2.60, RAY_AUTH_MODE=disabled as the README documents)."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, TINY_LLAMA

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_start_status_address_and_job_submit(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    port, dash = free_port(), free_port()
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"name: cli\nmodels:\n  - synthetic: {json.dumps(TINY_LLAMA)}\nprecisions: [fp32]\n"
                    "generation: {new_tokens: [3], batch_sizes: [1], prompt_tokens: 4, warmup: 0, repeats: 2}\n"
                    "perplexity: false\nresources: {gpus_per_task: 1, cpus_per_task: 1}\n")
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    start = subprocess.run([BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=2",
                            f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={temp}"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr
    try:
        for _ in range(30):  # the autoscaler's status appears a few seconds after start
            status = subprocess.run([BIN / "ray", "status", f"--address=127.0.0.1:{port}"], env=env,
                                    capture_output=True, text=True, timeout=60)
            if "GPU" in status.stdout:
                break
            time.sleep(1)
        assert status.returncode == 0 and "2.0 GPU" in status.stdout, status.stdout + status.stderr
        r = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(grid), "--address", f"127.0.0.1:{port}",
                            "--output", str(tmp_path / "a")], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"Ray at 127.0.0.1:{port}" in r.stdout
        row = pd.read_parquet(tmp_path / "a" / "cells").iloc[0]
        assert row.status == "ok" and row.cuda_visible_devices in ("0", "1") and row.gpus_per_task == 1
        job = subprocess.run([BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir",
                              str(ROOT), "--", "python", "-m", "orchestrator", "sweep", str(grid), "--output",
                              str(tmp_path / "b")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, job.stdout[-2000:] + job.stderr[-1500:]
        assert "Ray job" in job.stdout  # the sweep joined the job's cluster
        assert pd.read_parquet(tmp_path / "b" / "cells").iloc[0].status == "ok"
    finally:
        stop_cluster(temp)


def stop_cluster(temp: str) -> None:
    """Stop this test's cluster only (`ray stop` would stop every Ray on the machine, a user's sweep included)."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
