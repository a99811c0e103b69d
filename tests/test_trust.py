"""Trust boundaries: a grid, a results folder and a model file are untrusted input. Nothing in a grid runs code;
every write lands where it says (no link followed); the Ray token is private; a cell's key covers the weights it
measured and a row counts only for the cell its file names; crafted headers fail fast with one line; every bad input
is one line and exit 2; control characters never reach a terminal, a page or a chart raw; signals are an
interruption whenever they come."""
import json
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import psutil
import pytest

from cluster.connect import init_embedded, private_token
from orchestrator import sweep
from orchestrator.cli import main
from orchestrator.grid import load_grid
from orchestrator.plan import make_plan
from orchestrator.store import Store
from common.untrusted import BadInput
from tests.conftest import ROOT, SMOLLM2, TINY_LLAMA, write_grid

RUNNER = "tests.scripted:run_unit"
GRID = textwrap.dedent(f"""
    name: trust
    models:
      - synthetic: {json.dumps(TINY_LLAMA)}
        label: tiny
    precisions: [fp32]
    generation: {{new_tokens: [4, 8], batch_sizes: [1], prompt_tokens: 8, warmup: 0, repeats: 1}}
    perplexity: false
""")


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """The CLI in this process, from the grid's folder: (exit code, stdout, stderr)."""
    def run(text, *args, command="validate"):
        f = tmp_path / "grid.yaml"
        if text is not None:
            f.write_text(text)
        monkeypatch.chdir(tmp_path)
        code = main([command, *([str(f)] if command != "report" else []), *args])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def refused(r, *expected):
    """Exit 2, one line on stderr holding every expected piece, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: nothing outside the output folder may change."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


# ------------------------------------------------------------------------------ nothing in a grid runs code

def test_a_pkg_source_never_imports_the_package(tmp_path):
    """A `pkg:` file is found through installed distributions' metadata; a package on the import path (a folder
    beside the grid) is never imported, so its code never runs."""
    evil = tmp_path / "evilpkg"
    evil.mkdir()
    marker = tmp_path / "ran"
    (evil / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (evil / "model.gguf").write_bytes(b"GGUF")
    for source, expected in [("pkg:evilpkg/model.gguf", "no installed distribution provides the package 'evilpkg'"),
                             ("pkg:evilpkg.sub/model.gguf", "expected pkg:PACKAGE/relative/path"),
                             ("pkg:json.decoder/x.gguf", "expected pkg:PACKAGE/relative/path")]:
        write_grid(tmp_path / "g.yaml", GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}", f"gguf: {source}"))
        r = subprocess.run([sys.executable, "-m", "orchestrator", "validate", "g.yaml"], cwd=tmp_path, text=True,
                           capture_output=True, env={**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}"})
        refused(r, "models[0].gguf", expected)
        assert not marker.exists()
    # the quickstart's model is found the same way
    write_grid(tmp_path / "g.yaml", GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}", f"gguf: {SMOLLM2}"))
    assert main(["validate", str(tmp_path / "g.yaml")]) == 0


def test_remote_code_needs_the_command_line(cli):
    text = GRID.replace("label: tiny", "label: tiny\n    trust_remote_code: true")
    refused(cli(text), "models[0].trust_remote_code", "--trust-remote-code")
    assert cli(text, "--trust-remote-code").returncode == 0


# -------------------------------------------------------------------------- every write lands where it says

@pytest.fixture(scope="module")
def cpu_ray():
    import ray

    init_embedded(num_cpus=2, num_gpus=0, log_to_driver=False)
    yield
    ray.shutdown()


def run_sweep(g, out, **kw) -> int:
    """sweep.run with the scripted runner, as the CLI runs it: bad input is one line on stderr and exit 2."""
    try:
        return sweep.run(str(g), [], output=str(out), runner=RUNNER, live=False, **kw)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def sweep_grid(tmp_path, labels=("sleep-0.01",), name="g.yaml"):
    models = "\n".join(f"  - synthetic: {{family: opt, hidden_size: 8, layers: 1, heads: 1, ffn: 8, vocab: {i + 8}}}"
                       f"\n    label: {json.dumps(lab)}" for i, lab in enumerate(labels))
    return write_grid(tmp_path / name, textwrap.dedent("""
        name: cpu
        models:
        {models}
        precisions: [fp16]
        generation: {{new_tokens: [1, 2], batch_sizes: [1]}}
        perplexity: false
        resources: {{timeout_s: 60, retries: 0}}
    """).format(models=models))


@pytest.mark.parametrize("planted", ["report.html", ".lock", "sweep.json", "cells", "runs", "history"])
def test_a_link_in_the_output_folder_is_refused_and_never_followed(cpu_ray, tmp_path, capsys, planted):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / planted).symlink_to(outside if planted in ("cells", "runs", "history") else outside / "victim")
    before = snapshot(outside)
    code = run_sweep(sweep_grid(tmp_path), out) if planted != "history" else None
    if planted == "history":  # history/ is only written when a row is replaced: a rerun with --force
        (out / planted).unlink()
        assert run_sweep(sweep_grid(tmp_path), out) == 0
        (out / planted).symlink_to(outside)
        capsys.readouterr()
        code = run_sweep(sweep_grid(tmp_path), out, force=True)
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err, err
    assert f"{out / planted} is a link" in err
    assert snapshot(outside) == before


def test_a_link_where_a_row_should_be_is_set_aside_not_followed(cpu_ray, tmp_path, capsys):
    outside = tmp_path / "victim.parquet"
    outside.write_text("precious")
    out = tmp_path / "out"
    g = sweep_grid(tmp_path)
    keys = [c.key for c in make_plan(load_grid(g), "r", None, 0).cells]
    (out / "cells").mkdir(parents=True)
    (out / "cells" / f"{keys[0]}.parquet").symlink_to(outside)
    assert sweep.run(str(g), [], output=str(out), runner=RUNNER, live=False) == 0
    printed = capsys.readouterr().out
    assert f"{keys[0]}.parquet: a link, not a file" in printed and "set aside" in printed
    assert outside.read_text() == "precious"
    assert sorted(pd.read_parquet(out / "cells").cell_key) == sorted(keys)
    moved = list((out / "set-aside").rglob("*.parquet"))
    assert len(moved) == 1 and moved[0].is_symlink()


def test_the_report_writes_only_where_it_says(tmp_path, cli):
    store = Store(tmp_path / "res", "r")
    store.write({"cell_key": "good", "status": "ok", "model": "m", "precision": "fp16", "new_tokens": 4,
                 "batch_size": 1, "sweep": "s"})
    (tmp_path / "victim").write_text("precious")
    (tmp_path / "link.html").symlink_to(tmp_path / "victim")
    refused(cli(None, str(tmp_path / "res"), "-o", str(tmp_path / "link.html"), command="report"),
            "link.html is a link")
    (tmp_path / "folder.html").mkdir()
    refused(cli(None, str(tmp_path / "res"), "-o", str(tmp_path / "folder.html"), command="report"),
            "folder.html is a folder")
    (tmp_path / "res" / "report.html").symlink_to(tmp_path / "victim")
    refused(cli(None, str(tmp_path / "res"), command="report"), "report.html is a link")
    assert (tmp_path / "victim").read_text() == "precious"
    (tmp_path / "res" / "report.html").unlink()
    assert cli(None, str(tmp_path / "res"), command="report").returncode == 0
    assert (tmp_path / "res" / "report.html").is_file() and not (tmp_path / "res" / "report.html").is_symlink()


# ----------------------------------------------------------------------------------- the Ray token is private

def test_the_ray_token_file_is_private(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    private_token()  # none there: made here, private
    token = home / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert len(token.read_text()) == 64
    first = token.read_text()
    os.chmod(token, 0o644)  # as Ray (or `ray start`) makes it with a usual umask
    os.chmod(token.parent, 0o755)
    private_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert token.read_text() == first  # an existing token is kept


# ------------------------------------------------------------------ a cell's key covers what it measured

def _folder_model(folder: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.sources import synthetic_config

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(synthetic_config(TINY_LLAMA)).save_pretrained(folder)


def test_a_model_replaced_in_place_is_a_new_cell(tmp_path):
    folder = tmp_path / "model"
    _folder_model(folder, 0)
    g = write_grid(tmp_path / "g.yaml", GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}", f"path: {folder}"))

    def keys():
        plan = make_plan(load_grid(g), "r", None, 0)
        return [c.key for c in plan.cells], plan.units[0].unit_id

    before = keys()
    assert keys() == before  # stable while the model is the same
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    _folder_model(folder, 1)  # other weights, same shapes, same path
    os.utime(weights, ns=(mtime + 10 ** 9, mtime + 10 ** 9))
    after = keys()
    assert set(after[0]).isdisjoint(before[0]) and after[1] != before[1]


def test_quality_is_never_reused_across_fingerprints(tmp_path):
    from orchestrator import plan as plan_module
    from common.units import ModelSpec

    a = ModelSpec("path", "/m", "m", fingerprint="aaaa")
    b = ModelSpec("path", "/m", "m", fingerprint="bbbb")
    assert plan_module.digest(a.identity(), 20) != plan_module.digest(b.identity(), 20)
    assert json.loads(json.dumps(a.identity()))["fingerprint"] == "aaaa"


def test_a_row_under_another_cells_name_is_set_aside_and_never_counted(cpu_ray, tmp_path, capsys):
    out = tmp_path / "out"
    g = sweep_grid(tmp_path)
    assert sweep.run(str(g), [], output=str(out), runner=RUNNER, live=False) == 0
    a, b = sorted((out / "cells").glob("*.parquet"))
    b.write_bytes(a.read_bytes())  # b's file now holds a's row
    (out / "cells" / "foreign.parquet").write_bytes(pd.DataFrame({"x": [1]}).to_parquet())
    capsys.readouterr()
    assert main(["report", str(out), "--all"]) == 0
    err = capsys.readouterr().err
    assert f"{b.name}: its row is of cell" in err and "foreign.parquet: a column 'x'" in err
    assert sweep.run(str(g), [], output=str(out), runner=RUNNER, live=False) == 0
    printed = capsys.readouterr().out
    assert "set aside" in printed and b.name in printed and "1 to run (1 already ok" in printed
    rows = pd.read_parquet(out / "cells")
    assert sorted(rows.cell_key) == sorted([a.stem, b.stem])  # each cell once, each its own
    assert len(list((out / "set-aside").rglob("*.parquet"))) == 2


# ------------------------------------------------------------------------------ crafted headers fail fast

def _gguf(tensors=0, keys=b"", n_keys=0, tail=b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, n_keys) + keys + tail


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


CRAFTED_GGUF = [
    ("huge tensor count", _gguf(tensors=1 << 40), "tensor count 1,099,511,627,776 is more than the cap"),
    ("huge metadata count", _gguf(n_keys=1 << 40), "metadata count"),
    ("huge string array", _gguf(n_keys=1, keys=_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 40)),
     "an array's length 1,099,511,627,776 is more than the cap"),
    ("array over its bytes", _gguf(n_keys=1, keys=_string(b"t") + struct.pack("<IIQ", 9, 8, 1000)),
     "is more than its bytes hold"),
    ("huge string", _gguf(n_keys=1, keys=struct.pack("<Q", 1 << 40)), "a string's length"),
    ("truncated", _gguf(n_keys=1, keys=_string(b"general.architecture") + struct.pack("<I", 4)),
     "inside its header"),
    ("not gguf", b"NOPE" + bytes(100), "does not start with GGUF"),
    ("nested arrays", _gguf(n_keys=1, keys=_string(b"a") + struct.pack("<IIQ", 9, 9, 1)), "an array of arrays"),
]


@pytest.mark.parametrize("case,data,expected", CRAFTED_GGUF, ids=[c[0] for c in CRAFTED_GGUF])
def test_a_crafted_gguf_header_is_refused_in_one_line(cli, tmp_path, case, data, expected):
    f = tmp_path / "m.gguf"
    f.write_bytes(data)
    if case != "truncated":
        with open(f, "r+b") as fh:
            fh.truncate(max(len(data), 4096))  # a file of 4 KB on disk
    refused(cli(GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}", f"gguf: {f}")), "models[0].gguf", expected)


def test_crafted_model_folders_are_refused_in_one_line(cli, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    text = GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}", f"path: {folder}")
    with open(folder / "config.json", "wb") as f:
        f.truncate(512 << 20)  # sparse: 512 MiB that take no disk
    refused(cli(text), "models[0].path", "512.0 MiB, more than the 1 MiB read here")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(cli(text), "models[0].path", "nests deeper than 64 levels")
    (folder / "config.json").write_text("[1, 2]")
    refused(cli(text), "models[0].path", "is not a JSON mapping")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    refused(cli(text), "models[0].path", "not a readable safetensors file")


# ------------------------------------------------------------------------ one line and exit 2, never a traceback

ONE_LINE = [
    ("nested grid", "name: x\nmodels: " + "[" * 5000 + "]" * 5000 + "\n", (), ["grid.yaml", "nests"]),
    ("aliases that multiply", "a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
     "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
     "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n" + GRID, (),
     ["more than 100,000 values"]),
    ("nested --set", GRID, ("--set", "generation.new_tokens=" + "[" * 5000 + "]" * 5000), ["--set generation", "nests"]),
    ("memory budget out of range", GRID + "report: {memory_budgets: [1e30]}\n", (), ["report.memory_budgets[0]"]),
    ("memory budget negative", GRID + "report: {memory_budgets: [-5]}\n", (), ["report.memory_budgets[0]"]),
    ("merge key twice", "m: &m {warmup: 0}\n" + GRID.replace("generation: {", "generation: {<<: *m, <<: *m, "), (),
     ["the merge key << is given twice"]),
]


@pytest.mark.parametrize("case,text,args,expected", ONE_LINE, ids=[c[0] for c in ONE_LINE])
def test_bad_input_is_one_line(cli, case, text, args, expected):
    refused(cli(text, *args), *expected)


def test_an_output_folder_of_the_wrong_shape_is_one_line(cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cells").write_text("x")
    refused(cli(GRID, "--output", str(out)), "output:", "cells is a file; it must be a folder")
    (out / "cells").unlink()
    (out / ".lock").mkdir()
    refused(cli(GRID, "--output", str(out)), ".lock is a folder; it must be a regular file")
    (out / ".lock").rmdir()
    os.mkfifo(out / ".lock")
    r = cli(GRID, "--output", str(out), command="sweep")
    refused(r, ".lock is a FIFO")


def test_a_full_disk_before_start_is_one_line(cli, tmp_path, monkeypatch):
    import errno

    from orchestrator import checks

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checks, "replace_file", full)
    refused(cli(GRID, "--output", str(tmp_path / "out"), command="sweep"), "output:", "No space left on device")


def test_control_characters_and_markup_in_labels_stay_plain(cpu_ray, tmp_path, capsys):
    """A label that would clear the screen and set the window title, and one that matplotlib would read as mathtext:
    escaped in validate, progress, the summary and the report, and drawn as text."""
    labels = ("sleep-0.01 \x1b[2J\x1b]0;owned\x07", "sleep-0.01 $\\frac{a$")
    out = tmp_path / "out"
    g = sweep_grid(tmp_path, labels=labels)
    assert main(["validate", str(g), "--output", str(out)]) == 0
    assert sweep.run(str(g), [], output=str(out), runner=RUNNER, live=False) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "\x1b" not in text and "\x07" not in text and "\\x1b[2J\\x1b]0;owned\\x07" in text
    html = (out / "report.html").read_text()
    assert "\x1b" not in html and "\\x1b[2J" in html and "$\\frac{a$" in html


# ------------------------------------------------------------------ signals are an interruption, whenever they come

@pytest.mark.slow
def test_sigterm_still_reaches_the_sweep_after_its_ray_is_shut_down(tmp_path):
    """ray.shutdown() puts SIGTERM's default action back beneath Python's signal module: the sweep's handler must
    still run after it (a SIGTERM during the last cleanup would otherwise kill the process with its rows half-told)."""
    code = textwrap.dedent("""
        import os, signal, time
        from cluster.connect import connect, shutdown_started_here
        got = []
        connect(num_cpus=1)
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
        shutdown_started_here()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print("handled", got)
    """)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "HOME": str(tmp_path),
           "PYTHONPATH": str(ROOT), "RAY_TMPDIR": tempfile.mkdtemp(prefix="qs-", dir="/tmp")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "handled [15]" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


def test_a_signal_that_a_finalizer_swallowed_is_raised_at_the_next_check(capsys):
    """Python only prints what a finalizer raises: a signal that lands in one must not be lost (nor print a
    traceback); the next check raises it, until whoever catches it clears it."""
    from orchestrator import signals

    before, hook = {s: signal.getsignal(s) for s in signals.SIGNALS}, sys.unraisablehook

    class Finalized:
        def __del__(self):
            signals._raise(signal.SIGINT, None)  # as if SIGINT arrived while the finalizer ran

    try:
        signals.install()
        Finalized()
        with pytest.raises(signals.Interrupted, match="SIGINT"):
            signals.check()
        with pytest.raises(signals.Interrupted):
            signals.check()  # still noted: nobody has handled it
        signals.clear()
        signals.check()
        assert "Traceback" not in capsys.readouterr().err
    finally:
        signals.clear()
        sys.unraisablehook = hook
        for s, handler in before.items():
            signal.signal(s, handler)


def test_stopping_a_ray_never_started_does_not_import_it(monkeypatch):
    """A signal that cuts `import ray` short leaves a half-made module behind; the cleanup that follows (stop the Ray
    this process started: none) must not import it again, or it fails with a traceback instead of "interrupted"."""
    from cluster import connect

    monkeypatch.setattr(connect, "_started_here", False)
    monkeypatch.setitem(sys.modules, "ray", None)  # importing it now raises
    connect.shutdown_started_here()


@pytest.mark.slow
def test_signals_at_random_moments_interrupt_cleanly_and_a_rerun_resumes(tmp_path):
    """SIGINT or SIGTERM at a random moment (imports, Ray starting, units running, the report): exit 130 or 143 with
    "interrupted" and no traceback, the run marked interrupted in its manifest once the lock was taken, the rows so far
    intact, no Ray process left, the token file private; a rerun finishes the rest. (A signal that lands after the
    sweep ended finds it done: exit 0; or, while its Ray stops, which puts SIGTERM's default action back beneath
    Python for a moment, the signal itself ends the process, everything written.)"""
    g = sweep_grid(tmp_path, labels=("sleep-0.5", "sleep-0.7"))
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="qs-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "HOME": str(home),
           "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}
    code = ("from orchestrator import signals; signals.install(); import sys; from orchestrator import sweep; "
            f"signals.exit_with(sweep.run({str(g)!r}, [], output=sys.argv[1], runner={RUNNER!r}, live=False))")
    rng = random.Random(0)
    seen = set()
    for i in range(6):
        out = tmp_path / f"out{i}"
        signum = (signal.SIGINT, signal.SIGTERM)[i % 2]
        proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(rng.uniform(0.2, 12.0))
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=120)
        assert "Traceback" not in output, output
        if proc.returncode in (0, -signum):
            assert proc.returncode == 0 or json.loads((out / "sweep.json").read_text())["state"] == "ended", output
            seen.add("done")
            continue
        assert proc.returncode == 128 + signum, (proc.returncode, output)
        assert "interrupted" in output
        runs = list((out / "runs").glob("*.json"))
        if runs:
            seen.add("locked")
            assert json.loads(runs[0].read_text())["state"] == "interrupted"
        rows = pd.read_parquet(out / "cells") if list((out / "cells").glob("*.parquet")) else pd.DataFrame()
        seen.add(f"{len(rows)} rows")
        assert all(rows.status == "ok") if len(rows) else True
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _ray_processes(ray_tmp):
            time.sleep(0.5)
        assert not _ray_processes(ray_tmp)
        rerun = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env, text=True,
                               capture_output=True, timeout=180)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert len(pd.read_parquet(out / "cells")) == 4
    token = home / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert "locked" in seen, seen  # at least one signal landed while the sweep held its folder


def _ray_processes(tmpdir: Path) -> list:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(tmpdir) in part for part in p.info["cmdline"] or []):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out
