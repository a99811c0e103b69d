"""Every shipped grid validates anywhere: no host-specific paths (the model from a package, the texts from
WIKITEXT2_PATH / WIKITEXT2_VALID_PATH, a hub model from the local Hugging Face cache); and the campaign files that
drive the GPU runs name grids that exist."""
import json

import pytest
import yaml

from orchestrator.cli import main
from tests.conftest import ROOT, SHARED, WIKITEXT

EXAMPLES = sorted([ROOT / "grid.yaml", *(ROOT / "examples").glob("*.yaml")])


@pytest.fixture
def offline_machine(tmp_path, monkeypatch):
    """A machine with the two WikiText-2 files and OPT-125M's config in its Hugging Face cache, and no hub."""
    from tasks.sources import synthetic_config

    snapshot = tmp_path / "hf" / "models--facebook--opt-125m" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(synthetic_config("opt-125m").to_dict()))
    (tmp_path / "hf" / "models--facebook--opt-125m" / "refs").mkdir()
    (tmp_path / "hf" / "models--facebook--opt-125m" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WIKITEXT2_PATH", str(WIKITEXT))
    monkeypatch.setenv("WIKITEXT2_VALID_PATH", str(SHARED / "data" / "wikitext-2" / "wiki.valid.tokens"))
    return tmp_path


@pytest.mark.parametrize("grid", EXAMPLES, ids=[g.name for g in EXAMPLES])
def test_every_shipped_grid_validates(grid, offline_machine, capsys):
    text = grid.read_text()
    assert "/tmp/" not in text and "/stage/" not in text, "host-specific path in a shipped grid"
    code = main(["validate", str(grid), "--output", str(offline_machine / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert " cells in " in captured.out


def test_campaigns_name_grids_that_exist():
    from bench.campaign import load

    files = sorted((ROOT / "bench" / "campaigns").glob("*.yaml"))
    assert files
    for f in files:
        c = load(f)
        assert yaml.safe_load(f.read_text())["about"]
        for folder in c.get("seed") or []:  # cells not measured again: a folder that is not there is a mistake
            assert (ROOT / folder).is_dir(), (f.name, folder)
        for step in c.get("before") or []:
            scripts = [w for w in step["run"].split() if w.startswith("bench/") and w.endswith(".py")]
            assert scripts and all((ROOT / w).is_file() for w in scripts), (f.name, step["run"])
        for s in c["sweeps"]:
            if "grid" in s:
                assert (ROOT / s["grid"]).is_file(), (f.name, s["grid"])
            else:
                scripts = [w for w in s["run"].split() if w.startswith("bench/") and w.endswith(".py")]
                assert scripts and all((ROOT / w).is_file() for w in scripts), (f.name, s["run"])


def test_campaign_seed_copies_cells_and_names_a_missing_folder(tmp_path, capsys, monkeypatch):
    """The eighth session's first campaign found its seed folders missing on the GPU host (bench/gpu.sh did not copy
    docs/) and measured 5 published cells again without a word: seeding now says so."""
    import bench.campaign as campaign

    root = tmp_path / "root"
    (root / "published" / "quality" / "cells").mkdir(parents=True)
    (root / "published" / "quality" / "cells" / "abc.parquet").write_bytes(b"x")
    (root / "older" / "quality" / "cells").mkdir(parents=True)
    (root / "older" / "quality" / "cells" / "abc.parquet").write_bytes(b"old")  # the same cell, measured earlier
    (root / "older" / "quality" / "cells" / "def.parquet").write_bytes(b"y")
    monkeypatch.setattr(campaign, "ROOT", root)
    results = tmp_path / "results"
    campaign.seed({"seed": ["missing", "published", "older"], "sweeps": [{"name": "quality", "grid": "g.yaml"}]},
                  results)
    assert (results / "quality" / "cells" / "abc.parquet").read_bytes() == b"x"  # newest first: the first one wins
    assert (results / "quality" / "cells" / "def.parquet").read_bytes() == b"y"
    assert "seed missing: not found" in capsys.readouterr().err


def test_campaign_entries_run_with_their_environment_and_gpu(tmp_path, monkeypatch):
    """A campaign with `gpu:` gives everything it runs that GPU alone and no Ray address; an entry's `env:` reaches
    its process (the allocator's configuration is an entry's setting, not the host's)."""
    import bench.campaign as campaign

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # recorded, so that teardown undoes what run() sets
    c = {"gpu": 1, "sequential": True, "sweeps": [
        {"name": "a", "run": "echo $CUDA_VISIBLE_DEVICES $ALLOC addr={address}. > {results}/a.txt", "env": {"ALLOC": "x:1"}},
        {"name": "b", "run": "(printenv ALLOC || echo none) > {results}/b.txt"}]}
    assert campaign.run(c, tmp_path / "r") == 0
    assert (tmp_path / "r" / "a.txt").read_text().split() == ["1", "x:1", "addr=."]
    assert (tmp_path / "r" / "b.txt").read_text().strip() == "none"
    assert (tmp_path / "r" / "all.done").exists()


def test_a_campaign_beside_another_runs_on_its_share_of_the_host_s_cpus(tmp_path, monkeypatch):
    """On a host of 2 GPUs the campaign with gpu 1 runs everything on the second half of the host's CPUs, so that
    one sweep's compile workers leave the other's host-paced decode its CPUs (tasks/host_cpu.py); `cpus: all` shares
    them; the campaign's own process keeps them all."""
    import os

    import bench.campaign as campaign

    assert campaign.cpu_share(0, 2, list(range(32))) == list(range(16))
    assert campaign.cpu_share(1, 2, list(range(32))) == list(range(16, 32))
    assert campaign.cpu_share(1, 2, [5]) == [5]  # one CPU: nothing to split
    # by whole cores: where CPU i and i + 16 are hyperthreads of one core, each campaign gets 8 cores, both threads
    for c in range(32):
        (tmp_path / f"cpu{c}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{c}" / "topology" / "thread_siblings_list").write_text(f"{c % 16},{c % 16 + 16}\n")
    assert campaign.cpu_share(0, 2, list(range(32)), tmp_path) == list(range(8)) + list(range(16, 24))
    assert campaign.cpu_share(1, 2, list(range(32)), tmp_path) == list(range(8, 16)) + list(range(24, 32))
    assert campaign.cores([3, 19, 4], tmp_path) == [[3, 19], [4]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    mine = sorted(os.sched_getaffinity(0))
    show = "grep Cpus_allowed_list /proc/self/status > {results}/%s.txt"
    for name, extra in (("share", {}), ("all", {"cpus": "all"})):
        c = {"gpu": 1, "sweeps": [{"name": name, "run": show % name}], **extra}
        assert campaign.run(c, tmp_path / "r", gpus=2) == 0

    def allowed(name):  # "0-3,8" -> [0, 1, 2, 3, 8]
        spans = [p.split("-") for p in (tmp_path / "r" / f"{name}.txt").read_text().split()[-1].split(",")]
        return [c for s in spans for c in range(int(s[0]), int(s[-1]) + 1)]

    assert allowed("share") == campaign.cpu_share(1, 2, mine) and allowed("all") == mine
    assert (tmp_path / "r" / "cpus.txt").read_text().startswith("GPU 1 of 2: CPUs")
    assert sorted(os.sched_getaffinity(0)) == mine
