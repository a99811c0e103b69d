"""Reaching a Ray cluster: an embedded local Ray sized to this machine (no address), an existing cluster
(`auto`, HOST:PORT, ray://HOST:10001), or the cluster of a `ray job submit` (RAY_ADDRESS set by Ray).

Safe by default:
- An embedded Ray binds every service it starts (GCS, raylet, workers, agents) to loopback and starts no dashboard:
  it is started in Ray's single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, inherited by every process it
  starts), whose node address is 127.0.0.1. Nothing on the network can reach it.
- Token authentication (Ray 2.60's default) stays on: RAY_AUTH_MODE unset means token, for the embedded Ray (whose
  token file, ~/.ray/auth_token, is made here if there is none: 0600 in a 0700 folder, and fixed up to that if it is
  wider) and, when a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
  ~/.ray/auth_token), for a cluster given by address; see cluster/README.md for how the token reaches other nodes.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

# Environment that workers on other nodes need to behave like the driver's machine.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_TOKEN", "QSWEEP_CACHE",
                 "TRANSFORMERS_VERBOSITY")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIP_EXCLUDES = [".venv", ".git", "results", ".stage", ".whl", "studies", "**/__pycache__", "*.parquet"]


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


def token_path() -> Path:
    """Where Ray reads its token from a file: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def private_token() -> None:
    """The token file is a secret (whoever reads it can run code in the cluster): 0600 in a 0700 folder. Made here
    when no token is at hand and Ray would make one (Ray writes it with the process's umask, 0644 in a 0755 folder
    by default); fixed up when it exists wider, whoever made it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = token_path()
    default = not os.environ.get("RAY_AUTH_TOKEN_PATH")
    if default:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    if not path.exists() and default:
        import secrets

        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what Ray's own generator writes
    if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)


def token_at_hand() -> bool:
    """Whether a Ray token can be read where Ray looks for one."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or (Path(path).is_file() if path else
                                                       (Path.home() / ".ray" / "auth_token").is_file())


def _token_mode() -> None:
    """RAY_AUTH_MODE=token for this process and what it starts; Ray's config, read when ray was imported, is read
    again."""
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def init_embedded(**kwargs) -> None:
    """ray.init of a new local Ray on loopback only, with token authentication unless RAY_AUTH_MODE says otherwise,
    and no dashboard. New even when a `ray start` cluster runs on this machine: without address="local", ray.init
    joins the latest one (its ray_current_cluster file) and then refuses num_cpus/num_gpus."""
    import ray
    from ray._private import ray_constants

    if "RAY_AUTH_MODE" not in os.environ:
        _token_mode()  # Ray's default, said out loud (no warning on every run)
    if os.environ.get("RAY_AUTH_MODE") == "token":
        private_token()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts: node address 127.0.0.1
    ray_constants.ENABLE_RAY_CLUSTER = False                # and for this one, whose ray is imported already
    ray.init(address="local", include_dashboard=False, **kwargs)


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> ClusterInfo:
    import ray

    global _started_here
    if ray.is_initialized():
        return info("embedded", address)
    in_job = address is None and bool(os.environ.get("RAY_ADDRESS"))
    _started_here = True  # from here on, whatever happens, shutting down is ours
    try:
        if address is None and not in_job:
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            # workers of an embedded Ray inherit this process's environment: no runtime_env needed (it would also
            # keep Ray from reusing its prestarted workers)
            init_embedded(num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=False, configure_logging=False)
            return info("embedded", None)
        if "RAY_AUTH_MODE" not in os.environ and token_at_hand():
            _token_mode()  # Ray enables it by itself only for `auto`, not for an address
        if token_at_hand():
            private_token()
        ray.init(address=address, log_to_driver=False, runtime_env=_runtime_env(ship_code=not in_job),
                 configure_logging=False)
    except Exception as e:  # ConnectionError, auth errors, bad addresses
        hint = ""
        if "auth" in str(e).lower() or "token" in str(e).lower() or "UNAUTHENTICATED" in str(e):
            hint = (" (Ray token authentication: this driver needs the cluster's token in ~/.ray/auth_token, "
                    "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN, and RAY_AUTH_MODE=token; see cluster/README.md)")
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


def local_gpus() -> float:
    """GPUs an embedded Ray would find on this machine (Ray's own detection, CUDA_VISIBLE_DEVICES respected)."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    manager = get_accelerator_manager_for_resource("GPU")
    visible = manager.get_current_process_visible_accelerator_ids()
    found = manager.get_current_node_num_accelerators()
    return float(min(found, len(visible)) if visible is not None else found)


_started_here = False  # whether this process started the Ray it is connected to (embedded) or joined one


def shutdown_started_here() -> None:
    """Stop the Ray this process connected to (an embedded one: its processes too) unless a caller had started it;
    also after an interrupted start."""
    global _started_here
    if _started_here:  # never import ray otherwise: a signal may have cut its import short (a half-made module)
        import ray

        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        ray.shutdown()
        for s, handler in handlers.items():  # Ray's shutdown gives SIGTERM back to its default action, beneath
            if handler is not None:          # what Python's signal module believes is installed
                signal.signal(s, handler)
        _started_here = False
