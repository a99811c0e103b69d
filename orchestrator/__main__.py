import sys

from orchestrator import signals

signals.install()  # first: a signal during the imports below is an interruption too

try:
    from orchestrator.cli import main
except signals.Interrupted as e:
    print(f"interrupted ({e})", file=sys.stderr)
    signals.exit_with(e.exit_code)

signals.exit_with(main())
