"""Reaching a Ray cluster: an embedded local Ray sized to this machine (no address), an existing cluster
(`auto`, HOST:PORT, ray://HOST:10001), or the cluster of a `ray job submit` (RAY_ADDRESS set by Ray).

Ray 2.60 turns token authentication on by default. An embedded Ray makes its own token. To reach a cluster started
with `ray start`, the driver needs the same mode as the cluster: RAY_AUTH_MODE=token (the token is read from
~/.ray/auth_token or RAY_AUTH_TOKEN) or RAY_AUTH_MODE=disabled on both sides; see cluster/README.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Environment that workers on other nodes need to behave like the driver's machine.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_TOKEN", "QSWEEP_CACHE",
                 "TRANSFORMERS_VERBOSITY")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIP_EXCLUDES = [".venv", ".git", "results", ".stage", ".whl", "docs/results", "**/__pycache__", "*.parquet"]


@dataclass
class ClusterInfo:
    mode: str                         # embedded | address | job
    address: str | None
    nodes: int
    cpus: float
    gpus: float
    gpus_per_node: list[float] = field(default_factory=list)
    cpus_per_node: list[float] = field(default_factory=list)
    accelerators: list[str] = field(default_factory=list)  # Ray's accelerator types of the GPU nodes (e.g. "T4")

    def describe(self) -> str:
        where = {"embedded": "embedded local Ray", "job": "Ray job"}.get(self.mode, f"Ray at {self.address}")
        kinds = f" ({', '.join(self.accelerators)})" if self.accelerators else ""
        return f"{where}: {self.nodes} node(s), {self.cpus:g} CPU, {self.gpus:g} GPU{kinds}"


class ClusterError(Exception):
    """Cannot reach or use the cluster; the CLI prints it and exits with code 2."""


def _runtime_env(ship_code: bool) -> dict:
    env: dict = {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    if ship_code:
        env["working_dir"] = str(PROJECT_ROOT)
        env["excludes"] = SHIP_EXCLUDES
    return env


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> ClusterInfo:
    import ray

    if ray.is_initialized():
        return info("embedded", address)
    in_job = address is None and bool(os.environ.get("RAY_ADDRESS"))
    try:
        if address is None and not in_job:
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            # workers of an embedded Ray inherit this process's environment: no runtime_env needed (it would also
            # keep Ray from reusing its prestarted workers)
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            return info("embedded", None)
        ray.init(address=address, log_to_driver=False, runtime_env=_runtime_env(ship_code=not in_job),
                 configure_logging=False)
    except Exception as e:  # ConnectionError, auth errors, bad addresses
        hint = ""
        if "auth" in str(e).lower() or "token" in str(e).lower() or "UNAUTHENTICATED" in str(e):
            hint = (" (Ray token authentication: set RAY_AUTH_MODE=token with the cluster's token in "
                    "~/.ray/auth_token or RAY_AUTH_TOKEN, or start the cluster and this driver with "
                    "RAY_AUTH_MODE=disabled; see cluster/README.md)")
        raise ClusterError(f"cannot reach the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}{hint}") from None
    return info("job" if in_job else "address", address or os.environ.get("RAY_ADDRESS"))


def info(mode: str, address: str | None) -> ClusterInfo:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    gpn = [n["Resources"].get("GPU", 0.0) for n in alive]
    cpn = [n["Resources"].get("CPU", 0.0) for n in alive]
    acc = sorted({k.split(":", 1)[1] for n in alive for k in n["Resources"] if k.startswith("accelerator_type:")})
    return ClusterInfo(mode, address, len(alive), sum(cpn), sum(gpn), gpn, cpn, acc)


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
