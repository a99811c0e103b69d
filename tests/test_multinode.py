"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): units spread over the GPU nodes, and a node lost
mid-unit has its unfinished cells retried elsewhere."""
import textwrap
import threading
import time
from contextlib import contextmanager

import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster

from orchestrator import sweep
from orchestrator.cli import main


@contextmanager
def cluster_of(*gpus_per_node: int, cpus: int = 1):
    """A head without GPUs and one node per entry with that many GPUs (Ray's count; no CUDA here), Ray connected to
    it; yields the cluster and its GPU nodes."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "num_gpus": 0})
    nodes = [cluster.add_node(num_cpus=cpus, num_gpus=g) for g in gpus_per_node]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def sleep_grid(path, name: str, units: int, new_tokens: str, resources: str):
    """`units` tiny synthetic models, each sleeping about a second a cell (tests.scripted)."""
    models = "\n".join(f"  - synthetic: {{family: opt, hidden_size: 8, layers: 1, heads: 1, ffn: 8, vocab: {8 + i}}}"
                       f"\n    label: sleep-{1.0 + i / 100}" for i in range(units))
    path.write_text(textwrap.dedent("""
        name: {name}
        models:
        {models}
        precisions: [fp16]
        generation: {{new_tokens: {new_tokens}, batch_sizes: [1]}}
        perplexity: false
        resources: {{{resources}}}
    """).format(name=name, models=models, new_tokens=new_tokens, resources=resources))
    return path


@pytest.mark.slow
def test_node_loss_is_retried_on_another_node(tmp_path):
    with cluster_of(1, 1) as (cluster, (doomed, _)):
        g = sleep_grid(tmp_path / "g.yaml", "nodes", 2, "[1, 2, 3, 4]",
                       "gpus_per_task: 1, cpus_per_task: 0.5, timeout_s: 120, retries: 2")
        out = tmp_path / "out"

        def kill_a_node_once_cells_arrive():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(list((out / "cells").glob("*.parquet"))) < 2:
                time.sleep(0.05)
            cluster.remove_node(doomed)

        killer = threading.Thread(target=kill_a_node_once_cells_arrive)
        killer.start()
        code = sweep.run(str(g), [], output=str(out), runner="tests.scripted:run_unit", live=False)
        killer.join()
        df = pd.read_parquet(out / "cells")
        assert code == 0 and len(df) == 8 and set(df.status) == {"ok"}
        assert (df.attempt == 2).any()  # the unit on the lost node went on, elsewhere, with its unfinished cells
        assert df.groupby("model").cell_key.count().eq(4).all()


@pytest.mark.slow
def test_a_unit_over_several_gpus_holds_them_alone_and_one_no_node_can_hold_is_refused(tmp_path, capsys):
    """gpus_per_task 2 on nodes of 4 and 2 GPUs (GPUs Ray counts; no CUDA here): each unit sees exactly 2 GPUs of its
    own; 6 per unit, more than any node has, is refused in one line before anything runs."""
    with cluster_of(4, 2, cpus=2):
        g = sleep_grid(tmp_path / "g.yaml", "wide", 3, "[1, 2]",
                       "gpus_per_task: 2, cpus_per_task: 0.5, timeout_s: 120, retries: 0")
        out = tmp_path / "out"
        assert sweep.run(str(g), [], output=str(out), runner="tests.scripted:run_unit", live=False) == 0
        df = pd.read_parquet(out / "cells")
        assert len(df) == 6 and set(df.status) == {"ok"} and (df.gpus_per_task == 2).all()
        held = df.groupby("model").cuda_visible_devices.first()
        assert all(len(set(ids.split(","))) == 2 for ids in held)
        refused = tmp_path / "refused"
        capsys.readouterr()
        assert main(["sweep", str(g), "--output", str(refused), "--set", "resources.gpus_per_task=6"]) == 2
        assert "resources.gpus_per_task: 6 GPUs per task, but the largest node has 4" in capsys.readouterr().err
        assert not list(refused.glob("cells/*.parquet"))
