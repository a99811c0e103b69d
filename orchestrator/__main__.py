import sys

from orchestrator import signals

signals.install()  # first: a signal during the imports below is an interruption too

from orchestrator.cli import main  # noqa: E402

sys.exit(main())
