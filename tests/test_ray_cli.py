"""The README's cluster commands on this machine, with Ray 2.60's token authentication on as the README documents:
`ray get-auth-token --generate`, `ray start --head`, `ray status`, a sweep with `--address` (which finds the token by
itself), and `ray job submit` of the same command."""
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
    # as the README's one-machine commands: a token, RAY_AUTH_MODE=token, Ray's single-machine mode (loopback only)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    token = subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert token.returncode == 0 and token.stdout.strip(), token.stderr
    # ports of its own: another Ray on the machine (a user's sweep) holds the defaults, and the job agent's HTTP port
    # (52365) taken by one left `ray job submit` with "No available agent" for good (seen)
    port, dash = free_port(), free_port()
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"name: cli\nmodels:\n  - synthetic: {json.dumps(TINY_LLAMA)}\nprecisions: [fp32]\n"
                    "generation: {new_tokens: [3], batch_sizes: [1], prompt_tokens: 4, warmup: 0, repeats: 2}\n"
                    "perplexity: false\nresources: {gpus_per_task: 1, cpus_per_task: 1}\n")
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    start = subprocess.run([BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=2",
                            f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
                            "--disable-usage-stats", f"--temp-dir={temp}/ray"], env=env,
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
        plain = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}  # the sweep finds the token by itself
        r = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(grid), "--address", f"127.0.0.1:{port}",
                            "--output", str(tmp_path / "a")], cwd=ROOT, env=plain, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"Ray at 127.0.0.1:{port}" in r.stdout
        row = pd.read_parquet(tmp_path / "a" / "cells").iloc[0]
        assert row.status == "ok" and row.cuda_visible_devices in ("0", "1") and row.gpus_per_task == 1
        # a sweep without --address beside a `ray start` cluster: its own embedded Ray, not the cluster's (ray.init
        # with no address joins the one in ray_current_cluster, here under RAY_TMPDIR, and refused num_gpus)
        r = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(grid), "--output", str(tmp_path / "c")],
                           cwd=ROOT, env={**plain, "RAY_TMPDIR": temp}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "embedded local Ray" in r.stdout, r.stdout + r.stderr
        job = submit_when_the_agent_is_up(env, dash, grid, tmp_path / "b")
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, job.stdout[-2000:] + job.stderr[-1500:]
        assert "Ray job" in job.stdout  # the sweep joined the job's cluster
        assert pd.read_parquet(tmp_path / "b" / "cells").iloc[0].status == "ok"
    finally:
        stop_cluster(temp)


def submit_when_the_agent_is_up(env: dict, dash: int, grid: Path, out: Path, within_s: float = 240):
    """`ray job submit`, again while the head's job agent has not registered yet ("No available agent to submit
    job": `ray status` answers before the agent does, and on a loaded 2-core machine it can take a minute)."""
    deadline = time.monotonic() + within_s
    while True:
        job = subprocess.run([BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir",
                              str(ROOT), "--", "python", "-m", "orchestrator", "sweep", str(grid), "--output",
                              str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(3)


def stop_cluster(temp: str) -> None:
    """Stop this test's cluster only (`ray stop` would stop every Ray on the machine, a user's sweep included)."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
