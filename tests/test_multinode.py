"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): units spread over the GPU nodes, and a node lost
mid-unit has its unfinished cells retried elsewhere."""
import textwrap
import threading
import time

import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster

from orchestrator import sweep
from orchestrator.cli import main


@pytest.mark.slow
def test_node_loss_is_retried_on_another_node(tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    doomed = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        models = "\n".join(f"  - synthetic: {{family: opt, hidden_size: 8, layers: 1, heads: 1, ffn: 8, vocab: {8 + i}}}"
                           f"\n    label: sleep-{1.0 + i / 100}" for i in range(2))
        (tmp_path / "g.yaml").write_text(textwrap.dedent("""
            name: nodes
            models:
            {models}
            precisions: [fp16]
            generation: {{new_tokens: [1, 2, 3, 4], batch_sizes: [1]}}
            perplexity: false
            resources: {{gpus_per_task: 1, cpus_per_task: 0.5, timeout_s: 120, retries: 2}}
        """).format(models=models))
        out = tmp_path / "out"

        def kill_a_node_once_cells_arrive():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(list((out / "cells").glob("*.parquet"))) < 2:
                time.sleep(0.05)
            cluster.remove_node(doomed)

        killer = threading.Thread(target=kill_a_node_once_cells_arrive)
        killer.start()
        code = sweep.run(str(tmp_path / "g.yaml"), [], output=str(out), runner="tests.scripted:run_unit", live=False)
        killer.join()
        df = pd.read_parquet(out / "cells")
        assert code == 0 and len(df) == 8 and set(df.status) == {"ok"}
        assert (df.attempt == 2).any()  # the unit on the lost node went on, elsewhere, with its unfinished cells
        assert df.groupby("model").cell_key.count().eq(4).all()
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_a_unit_over_several_gpus_holds_them_alone_and_one_no_node_can_hold_is_refused(tmp_path, capsys):
    """gpus_per_task 2 on nodes of 4 and 2 GPUs (GPUs Ray counts; no CUDA here): each unit sees exactly 2 GPUs of its
    own; 6 per unit, more than any node has, is refused in one line before anything runs."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    cluster.add_node(num_cpus=2, num_gpus=4)
    cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        models = "\n".join(f"  - synthetic: {{family: opt, hidden_size: 8, layers: 1, heads: 1, ffn: 8, vocab: {8 + i}}}"
                           f"\n    label: sleep-{1.0 + i / 100}" for i in range(3))
        g = tmp_path / "g.yaml"
        g.write_text(textwrap.dedent("""
            name: wide
            models:
            {models}
            precisions: [fp16]
            generation: {{new_tokens: [1, 2], batch_sizes: [1]}}
            perplexity: false
            resources: {{gpus_per_task: 2, cpus_per_task: 0.5, timeout_s: 120, retries: 0}}
        """).format(models=models))
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
    finally:
        ray.shutdown()
        cluster.shutdown()
