"""Checks that need no cluster, made by `validate` and by `sweep` before Ray starts: the output folder can be written,
every model source can be loaded, and the lengths the grid asks for fit each model's context."""
from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

from common.untrusted import BadInput, check_file_slot, kind_of, open_folder, replace_file
from orchestrator.grid import Grid
from orchestrator.headers import read_config
from orchestrator.model_info import check_source, context_length, hub_offline, identify
from tasks.precisions import REGISTRY


FOLDERS = ("cells", "history", "runs", "set-aside")    # inside an output folder: folders, never links
FILES = (".lock", "sweep.json", "report.html")        # regular files, never links


def check_output(out: Path) -> None:
    """The output folder exists or can be made, a file can be written there, and what stands at the paths a sweep
    writes is what it must be (a folder, a regular file; no link)."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"output: {out} is {kind_of(os.lstat(out).st_mode)}; the output must be a folder")
    try:
        fd = open_folder(out)
    except OSError as e:
        raise BadInput(f"output: cannot make {out} ({e.strerror or e})") from None
    try:
        for name in FOLDERS:
            try:
                mode = os.lstat(name, dir_fd=fd).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(mode):
                raise BadInput(f"output: {out / name} is {kind_of(mode)}; it must be a folder (move it away)")
        for name in FILES:
            check_file_slot(fd, name, out)
        probe = f".write-test-{uuid.uuid4().hex[:8]}"
        try:
            replace_file(fd, probe, b"probe", out)
            os.unlink(probe, dir_fd=fd)
        except OSError as e:
            raise BadInput(f"output: cannot write to {out} ({e.strerror or e})") from None
    finally:
        os.close(fd)


def check_models(grid: Grid) -> None:
    """Every source reachable; prompt + generated tokens, the perplexity window and the KV-cache perplexity windows
    within each model's context length (read from its config, not by loading it)."""
    base = grid._base_dir
    offline = hub_offline() if any(m.hub for m in grid.models) else False
    g, ppl = grid.generation, grid.perplexity
    for i, entry in enumerate(grid.models):
        model = entry.spec(base)
        check_source(model, f"models[{i}]", offline)
        identify(model, f"models[{i}]")
        ctx = context_length(model)
        if not ctx:
            continue
        name, longest = model.label, max(g.prompt_tokens) + max(g.new_tokens)
        if longest > ctx:
            raise BadInput(f"generation.new_tokens: {max(g.new_tokens)} new tokens after a {max(g.prompt_tokens)}-token "
                           f"prompt need {longest} positions; {name} holds {ctx}")
        if ppl and ppl.seqlen > ctx:
            raise BadInput(f"perplexity.seqlen: windows of {ppl.seqlen} tokens; {name} holds {ctx}")
        if ppl and g.quantized_kv and ppl.kv_prefill + ppl.kv_continuation > ctx:
            raise BadInput(f"perplexity.kv_prefill: {ppl.kv_prefill} + kv_continuation {ppl.kv_continuation} tokens; "
                           f"{name} holds {ctx}")


def check_saved(grid: Grid) -> None:
    """A precision that loads a checkpoint saved quantized (tasks/precisions/saved.py) names a folder with a
    config.json that carries a quantization_config."""
    for j, p in enumerate(grid.precisions):
        loading = REGISTRY[p.name].loading
        if loading.folder is None:
            continue
        where = f"precisions[{j}].path"
        folder = loading.folder(REGISTRY[p.name].parse_options(p.options))
        if folder is None:
            raise BadInput(f"{where}: {p.name} loads a checkpoint saved quantized: name its folder")
        folder = Path(folder)
        if not folder.is_dir():
            raise BadInput(f"{where}: {folder} is not a folder; a Hugging Face folder saved quantized is needed")
        if not (read_config(folder, where)).get("quantization_config"):
            raise BadInput(f"{where}: {folder}/config.json has no quantization_config: not a checkpoint saved "
                           f"quantized (an unquantized model is a model entry)")


def check_code(grid: Grid, trust_remote_code: bool) -> None:
    """A grid is data: a model whose own Python code would run (trust_remote_code) needs the command line's
    --trust-remote-code as well."""
    for i, m in enumerate(grid.models):
        if m.trust_remote_code and not trust_remote_code:
            raise BadInput(f"models[{i}].trust_remote_code: true runs Python code shipped with the model; pass "
                           f"--trust-remote-code on the command line to allow it")


def check_inputs(grid: Grid, out: Path, trust_remote_code: bool = False) -> None:
    check_code(grid, trust_remote_code)
    check_output(out)
    check_models(grid)
    check_saved(grid)


def output_dir(grid: Grid, output: str | None) -> Path:
    """--output, else the grid's `output` (relative to where the command runs), else results/<name>; `~` expanded."""
    return Path(os.path.expanduser(output or grid.output or str(Path("results") / grid.name)))
