"""Command line: `python -m orchestrator sweep|validate|report|schema`."""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

EPILOG = "Exit codes: 0 all cells ok, 1 some cells failed, 2 bad input."


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator", description="Quantization sweeps on Ray: "
                                "perplexity, latency and memory per model x precision x length x batch.", epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)
    sets = dict(action="append", default=[], metavar="KEY=VALUE",
                help="override a grid field, e.g. --set perplexity.max_windows=8 --set 'precisions=[fp16,nf4]'")

    s = sub.add_parser("sweep", help="run a sweep", epilog=EPILOG,
                       description="Expand the grid, run one GPU-pinned Ray task per (model, precision), stream "
                                   "every finished cell into Parquet and write report.html. Re-running resumes.")
    s.add_argument("grid", help="grid YAML file")
    s.add_argument("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: an embedded local "
                                     "Ray, or the job's cluster under `ray job submit`)")
    s.add_argument("--output", help="output folder (default: the grid's `output`, else results/<name>)")
    s.add_argument("--set", dest="overrides", **sets)
    s.add_argument("--force", action="store_true", help="rerun cells that are already ok")

    v = sub.add_parser("validate", help="check a grid and print the plan; runs nothing")
    v.add_argument("grid")
    v.add_argument("--set", dest="overrides", **sets)
    v.add_argument("--output")
    v.add_argument("--gpu", metavar="TYPE", help="the GPUs the sweep will run on (Ray accelerator type: T4, A100, "
                                                 "L4, H100, ...), to list the precisions they cannot run")

    r = sub.add_parser("report", help="render the HTML report of one or more result folders")
    r.add_argument("dirs", nargs="+", metavar="DIR", help="sweep output folder(s); several are merged")
    r.add_argument("-o", "--output", help="HTML file (default: DIR/report.html)")

    sub.add_parser("schema", help="print the results schema as Markdown")
    return p


def validate(args) -> int:
    from orchestrator.grid import load_grid
    from orchestrator.plan import unsupported_before_start, unsupported_cells
    from orchestrator.store import cell_statuses
    from orchestrator.sweep import output_dir, plan_for, pending_units

    grid = load_grid(args.grid, args.overrides)
    plan, _ = plan_for(grid)
    out = output_dir(grid, args.output)
    done = cell_statuses(out)
    todo = sum(len(u.cells) for u in pending_units(plan, done, False))
    g = grid.generation
    print(f"grid {grid.name}: {len(grid.models)} model(s) × {len(grid.precisions)} precision(s) × "
          f"{len(g.new_tokens)} length(s) × {len(g.batch_sizes)} batch size(s) = {len(plan.cells)} cells "
          f"in {len(plan.units)} units (one model load each)")
    print(f"baseline {grid.baseline}; output {out} ({len(plan.cells) - todo} cells already ok there, {todo} to run)")
    gp = grid.resources.gpus_per_task
    print(f"GPUs asked for: {gp:g} per unit, {gp * len(plan.units):g} GPU-tasks in all; timeout "
          f"{grid.resources.timeout_s:g} s, retries {grid.resources.retries}")
    ppl = plan.perplexity
    print("perplexity: off" if not ppl else
          f"perplexity: protocol {ppl['protocol']}, seqlen {ppl['seqlen']}, windows {ppl['max_windows'] or 'all'}, "
          f"batch {ppl['batch_size']}, data {ppl['dataset']}")
    device = "cuda" if gp > 0 else "cpu"
    unsupported = unsupported_before_start(plan, device, [args.gpu] if args.gpu else [])
    for u in plan.units:
        if u.unit_id in unsupported:
            print(f"skipped before start ({len(u.cells)} cells): {u.label}: {unsupported[u.unit_id]}")
    cells = unsupported_cells(plan, device)  # axis values a backend cannot run (compiled decode, quantized KV cache)
    for reason, n in Counter(cells.values()).items():
        print(f"skipped before start ({n} cell{'s' * (n != 1)}): {reason}")
    if device == "cuda" and not args.gpu:
        from tasks.precisions import REGISTRY

        needs = sorted({u.precision["label"] for u in plan.units if REGISTRY[u.precision["name"]].min_capability(
            REGISTRY[u.precision["name"]].parse_options(u.precision["options"]))})
        if needs:
            print(f"depends on the GPU (checked against the cluster's GPUs when the sweep starts; or pass --gpu): "
                  f"{', '.join(needs)}")
    print("units (largest first):")
    for u in plan.units:
        print(f"  {u.unit_id}  {u.label}: {len(u.cells)} cells "
              f"(new_tokens {sorted({c.new_tokens for c in u.cells})}, batch {sorted({c.batch_size for c in u.cells})})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from orchestrator.grid import GridError

    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sweep":
            from orchestrator.sweep import run

            return run(args.grid, args.overrides, address=args.address, output=args.output, force=args.force)
        if args.command == "validate":
            return validate(args)
        if args.command == "report":
            from reports.build import render
            from pathlib import Path

            for d in args.dirs:
                if not Path(d).is_dir():
                    raise GridError(f"report: {d} is not a folder")
            target = Path(args.output) if args.output else Path(args.dirs[0]) / "report.html"
            print(render(args.dirs, target))
            return 0
        if args.command == "schema":
            from orchestrator.schema import markdown

            sys.stdout.write(markdown())
            return 0
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2
