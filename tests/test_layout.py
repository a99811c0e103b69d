"""Imports run one way (orchestrator -> tasks, reports); the schema document matches the code."""
import ast
import subprocess
import sys

import pytest

from orchestrator.schema import markdown
from tests.conftest import ROOT


def imported_roots(package: str) -> set[str]:
    roots = set()
    for f in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package,forbidden", [("tasks", {"ray", "orchestrator", "reports", "cluster"}),
                                               ("reports", {"torch", "ray", "orchestrator", "tasks", "transformers"}),
                                               ("cluster", {"torch", "orchestrator", "tasks", "reports"})])
def test_import_direction(package, forbidden):
    assert not imported_roots(package) & forbidden


def test_reports_load_without_torch():
    code = "import sys, reports.build; assert 'torch' not in sys.modules, 'torch was imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_schema_document_is_current():
    assert (ROOT / "docs" / "schema.md").read_text() == markdown(), "run: python -m orchestrator schema > docs/schema.md"
