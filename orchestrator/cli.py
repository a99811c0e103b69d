"""Command line: `quant-sweep sweep|validate|report|schema` (also `python -m orchestrator ...`)."""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from cluster.connect import local_gpus
from orchestrator.checks import check_inputs, output_dir
from orchestrator.signals import Interrupted, clear, interruptible
from common.untrusted import BadInput, plain
from orchestrator.grid import load_grid
from orchestrator.schedule import resources_for, schedule
from orchestrator.wikitext import read_texts
from common.schema import markdown
from tasks.precisions import REGISTRY

EPILOG = "Exit codes: 0 all cells ok, 1 some cells failed, 2 bad input."


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quant-sweep", description="Quantization sweeps on Ray: WikiText-2 quality, "
                                "latency and memory per model x precision x length x batch, to Parquet and an HTML "
                                "report. Also runs as `python -m orchestrator`.", epilog=EPILOG)
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
    code = dict(action="store_true", help="allow models whose grid entry says trust_remote_code: true to run the "
                                          "Python code shipped with them (a grid alone never runs code)")
    s.add_argument("--trust-remote-code", **code)

    v = sub.add_parser("validate", help="check a grid and print the plan; runs nothing", epilog=EPILOG,
                       description="Check the grid, its files and models as `sweep` would before starting, then print "
                                   "the cells and units it plans, how many are already ok in the output folder, and "
                                   "what would be skipped before start. Starts no Ray and measures nothing.")
    v.add_argument("grid", help="grid YAML file")
    v.add_argument("--set", dest="overrides", **sets)
    v.add_argument("--output", help="output folder to count finished cells in (default: as for sweep)")
    v.add_argument("--trust-remote-code", **code)
    v.add_argument("--gpu", metavar="TYPE", help="the GPUs the sweep will run on (Ray accelerator type: T4, A100, "
                                                 "L4, H100, ...), to list the precisions they cannot run")

    r = sub.add_parser("report", help="render the HTML report of one or more result folders",
                       description="Re-render a sweep's report, or merge several sweeps into one. By default each "
                                   "folder shows the cells of its latest sweep's grid; --all shows every row kept "
                                   "there (cells of earlier grids too).")
    r.add_argument("dirs", nargs="+", metavar="DIR", help="sweep output folder(s); several are merged")
    r.add_argument("-o", "--output", help="HTML file (default: DIR/report.html)")
    r.add_argument("--all", action="store_true", help="every row in the folders, not only the latest grid's cells")

    sub.add_parser("schema", help="print the results schema as Markdown")
    return p


def validate(args) -> int:
    grid = load_grid(args.grid, args.overrides)
    out = output_dir(grid, args.output)
    check_inputs(grid, out, args.trust_remote_code)
    texts = read_texts(grid)
    # where it would run: this machine (an embedded Ray), or GPUs of the type --gpu names
    gpus = [max(grid.resources.gpus_per_task, 1.0)] if args.gpu else [local_gpus()]
    resources = resources_for(grid, gpus, [float(os.cpu_count() or 1)], [args.gpu] if args.gpu else [])
    sched = schedule(grid, out, resources, texts)
    plan, g = sched.plan, grid.generation
    print(f"grid {grid.name}: {len(grid.models)} model(s) × {len(grid.precisions)} precision(s) × "
          f"{len(g.new_tokens)} length(s) × {len(g.batch_sizes)} batch size(s) = {len(plan.cells)} cells "
          f"in {len(plan.units)} units (one model load each)")
    print(f"baseline {plain(grid.baseline)}; output {plain(out)} ({sched.already_ok} cells already ok there, {sched.to_run} to run)")
    where = f"GPUs of type {args.gpu}" if args.gpu else "this machine"
    print(f"on {where}: {resources.gpus_per_task:g} GPU and {resources.cpus_per_task:g} CPU per unit, "
          f"{resources.gpus_per_task * len(plan.units):g} GPU-tasks in all; timeout {grid.resources.timeout_s:g} s, "
          f"retries {grid.resources.retries}")
    for note in resources.notes:
        print(f"note: {plain(note)}")
    ppl = plan.perplexity
    print("perplexity: off" if not ppl else
          f"perplexity: protocol {ppl.protocol}, seqlen {ppl.seqlen}, windows {ppl.max_windows or 'all'}, "
          f"batch {ppl.batch_size or 'auto (8, or 1 where batching changes the numbers)'}, "
          f"data {plain(ppl.dataset)}; distance to {plain(grid.baseline)}")
    for u, reason in sched.skipped_units:
        print(f"skipped before start ({len(u.cells)} cells): {plain(u.label)}: {plain(reason)}")
    for reason, n in Counter(r for _, _, r in sched.skipped_cells).items():
        print(f"skipped before start ({n} cell{'s' * (n != 1)}): {plain(reason)}")
    if resources.device == "cuda" and not args.gpu:
        needs = sorted({u.precision.label for u in plan.units if REGISTRY[u.precision.name].min_capability(
            REGISTRY[u.precision.name].parse_options(u.precision.options))})
        if needs:
            print(f"depends on the GPU (checked against the cluster's GPUs when the sweep starts; or pass --gpu): "
                  f"{plain(', '.join(needs))}")
    print("units (largest first):")
    for u in plan.units:
        print(f"  {u.unit_id}  {plain(u.label)}: {len(u.cells)} cells "
              f"(new_tokens {sorted({c.new_tokens for c in u.cells})}, batch {sorted({c.batch_size for c in u.cells})})")
    return 0


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        if args.command == "sweep":
            from orchestrator.sweep import run  # (imports Ray's driver side when it connects)

            return run(args.grid, args.overrides, address=args.address, output=args.output, force=args.force,
                       trust_remote_code=args.trust_remote_code)
        with interruptible():
            if args.command == "validate":
                return validate(args)
            if args.command == "report":
                return report(args)
        sys.stdout.write(markdown())
        return 0
    except BadInput as e:
        print("error: " + "\n".join(plain(line) for line in str(e).split("\n")), file=sys.stderr)
        return 2
    except Interrupted as e:
        clear()
        print(f"interrupted ({e})", file=sys.stderr)
        return e.exit_code


def entry() -> None:
    """The console script: signals are an interruption from the first moment."""
    from orchestrator import signals

    signals.install()
    signals.exit_with(main())


def report(args) -> int:
    from reports.build import render  # (matplotlib: seconds to import, only here)

    for d in args.dirs:
        if not Path(d).expanduser().is_dir():
            raise BadInput(f"report: {d} is not a folder")
    dirs = [Path(d).expanduser() for d in args.dirs]
    target = Path(args.output).expanduser() if args.output else dirs[0] / "report.html"
    try:
        path, unreadable = render(dirs, target, every_row=args.all)
    except OSError as e:
        raise BadInput(f"report: cannot write {target} ({e.strerror or e})") from None
    for bad in unreadable:
        print(f"warning: left out: {plain(bad)}", file=sys.stderr)
    print(plain(path))
    return 0
