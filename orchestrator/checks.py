"""Checks that need no cluster, made by `validate` and by `sweep` before Ray starts: the output folder can be written,
every model source can be loaded, and the lengths the grid asks for fit each model's context."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from orchestrator.files import BadInput
from orchestrator.grid import Grid
from orchestrator.model_info import check_source, context_length, hub_offline


def check_output(out: Path) -> None:
    """The output folder exists or can be made, and a file can be written there."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"output: {out} is a file; the output must be a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"output: cannot write to {out} ({e.strerror or e})") from None


def check_models(grid: Grid) -> None:
    """Every source reachable; prompt + generated tokens, the perplexity window and the KV-cache perplexity windows
    within each model's context length (read from its config, not by loading it)."""
    base = grid._base_dir
    offline = hub_offline() if any(m.hub for m in grid.models) else False
    g, ppl = grid.generation, grid.perplexity
    for i, entry in enumerate(grid.models):
        model = entry.spec(base)
        check_source(model, f"models[{i}]", offline)
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


def check_inputs(grid: Grid, out: Path) -> None:
    check_output(out)
    check_models(grid)


def output_dir(grid: Grid, output: str | None) -> Path:
    """--output, else the grid's `output` (relative to where the command runs), else results/<name>; `~` expanded."""
    return Path(os.path.expanduser(output or grid.output or str(Path("results") / grid.name)))
