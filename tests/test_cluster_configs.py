"""The ready cluster configs parse, and the GPUs they give each Ray node agree with what their sweep asks for."""
import shlex

import yaml

from orchestrator.grid import load_grid
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
GPUS_PER_INSTANCE = {"g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g4dn.4xlarge": 1, "g4dn.8xlarge": 1, "g4dn.12xlarge": 4,
                     "g4dn.16xlarge": 1, "g4dn.metal": 8, "m5.xlarge": 0}


def test_ray_up_config():
    cfg = yaml.safe_load((CLUSTER / "aws-t4.yaml").read_text())
    grid = load_grid(CLUSTER / "sweep-t4.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    gpu_types = 0
    for name, node in cfg["available_node_types"].items():
        instance = node["node_config"]["InstanceType"]
        assert node["resources"]["GPU"] == GPUS_PER_INSTANCE[instance], name
        if node["resources"]["GPU"]:
            gpu_types += 1
            assert instance.startswith("g4dn")  # T4
            assert node["resources"]["GPU"] >= grid.resources.gpus_per_task
            assert node["max_workers"] <= cfg["max_workers"]
    assert gpu_types >= 1
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "--num-gpus=1" in workers and "RAY_AUTH_MODE=token" in workers
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "0.0.0.0" not in head  # dashboard on the head's loopback
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # one token on every node


def test_kuberay_rayjob():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "orchestrator", "sweep"]
    grid = load_grid(ROOT / argv[4])
    assert grid.resources.gpus_per_task > 0
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"].startswith("2.60")
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        ray_gpus = float(group["rayStartParams"]["num-gpus"])
        container = group["template"]["spec"]["containers"][0]
        k8s_gpus = float(container["resources"]["limits"]["nvidia.com/gpu"])
        assert ray_gpus == k8s_gpus >= grid.resources.gpus_per_task
        instance = group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        assert GPUS_PER_INSTANCE[instance] >= k8s_gpus
        assert any(e["name"] == "RAY_AUTH_MODE" for e in container["env"])
