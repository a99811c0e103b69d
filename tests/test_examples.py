"""Every shipped grid validates anywhere: no host-specific paths (the model from a package, the texts from
WIKITEXT2_PATH / WIKITEXT2_VALID_PATH, a hub model from the local Hugging Face cache); and the campaign files that
drive the GPU runs name grids that exist."""
import json
from pathlib import Path

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




def test_study_campaigns_name_grids_that_exist():
    """Each study's campaign names grids beside it and nothing outside the project (studies/harness/campaign.py)."""
    import sys

    sys.path.insert(0, str(ROOT / "studies" / "harness"))
    from campaign import command, load

    files = sorted((ROOT / "studies").glob("*/campaign.yaml"))
    assert files
    for f in files:
        c = load(f)
        assert yaml.safe_load(f.read_text())["about"]
        for s in c["sweeps"]:
            assert (f.parent / s["grid"]).is_file(), (f, s["grid"])
            cmd = command(s, f.parent, Path("/r"))
            assert cmd[1:4] == ["-m", "orchestrator", "sweep"] and cmd[-2:] != ["--output", ""]
