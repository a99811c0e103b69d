"""One room per kind of knowledge, imports one way: common (what the driver, the workers and the report share) imports no project module and no torch;
orchestrator -> common, tasks (the precision registry only), reports, cluster; tasks never imports Ray or the driver;
reports never torch; no module imports another's private names. And the schema document matches the code."""
import ast
import re
import subprocess
import sys

import pytest

from common.schema import markdown
from tests.conftest import ROOT

PROJECT = {"common", "orchestrator", "tasks", "reports", "cluster"}


def imports(package: str) -> list[tuple[str, str, list[str]]]:
    """(file, module imported, names imported from it) for every absolute import in a package."""
    out = []
    for f in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                out += [(str(f.relative_to(ROOT)), a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((str(f.relative_to(ROOT)), node.module, [a.name for a in node.names]))
    return out


def roots(package: str) -> set[str]:
    return {module.split(".")[0] for _, module, _ in imports(package)}


@pytest.mark.parametrize("package,forbidden", [
    ("common", PROJECT - {"common"} | {"torch", "transformers", "ray", "numpy", "pandas"}),
    ("tasks", {"ray", "orchestrator", "reports", "cluster"}),
    ("reports", {"torch", "ray", "orchestrator", "tasks", "transformers"}),
    ("cluster", {"torch", "orchestrator", "tasks", "reports"})])
def test_import_direction(package, forbidden):
    assert not roots(package) & forbidden


def test_the_driver_takes_only_the_precision_registry_from_tasks():
    from_tasks = {(f, m) for f, m, _ in imports("orchestrator") if m.split(".")[0] == "tasks"}
    assert from_tasks and all(m == "tasks.precisions" for _, m in from_tasks), from_tasks


def test_no_module_imports_another_modules_private_names():
    private = [(f, m, n) for pkg in PROJECT | {"tests", "bench"} for f, m, names in imports(pkg)
               if m.split(".")[0] in PROJECT for n in names if n.startswith("_")]
    assert private == []


@pytest.mark.parametrize("modules", ["common.schema, common.rows, common.units, common.catalog, common.models",
                                     "reports.build"])
def test_contract_and_report_load_without_torch(modules):
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch was imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_schema_document_is_current():
    assert (ROOT / "docs" / "schema.md").read_text() == markdown(), "run: python -m orchestrator schema > docs/schema.md"


def test_schema_table_has_three_cells_per_row():
    """A `|` inside a column's meaning (there are several: 'a | b' alternatives) is escaped, or the row breaks."""
    rows = [line for line in markdown().splitlines() if line.startswith("| `")]
    assert len(rows) > 100 and any("\\|" in r for r in rows)
    assert all(len(re.findall(r"(?<!\\)\|", r)) == 4 for r in rows)


HISTORY = re.compile(r"(?<![\d.-])1[12]-[0-3]\d[a-j]?(?![\d.])|session ?\d+|\b\w+(?:th|st|nd|rd) session\b|"
                     r"issue \d+|" + "h200" + "-2026|docs/" + "results", re.I)  # (split: this line is scanned too)


def test_code_docs_and_names_state_rules_not_history():
    """No dated run tags, run numbering or issue numbers in code, examples, docs or file names: history lives in
    git and CHANGELOG.md (whose versions are the measurement's, not dates of runs)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if HISTORY.search(name):
            found.append(name)
        if path.suffix in (".py", ".md", ".yaml", ".yml", ".sh", ".j2", ".toml", ".txt", ".cfg") and path.is_file():
            for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if HISTORY.search(line.replace('scope="session"', "")):
                    found.append(f"{name}:{i}: {line.strip()[:100]}")
    assert found == [], "\n".join(found[:30])
