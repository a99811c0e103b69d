"""SIGINT (Ctrl-C) and SIGTERM (what `ray job stop`, systemd and Kubernetes send) are an interruption wherever they
come: Ray starting, a unit running, the report rendering. Both raise `Interrupted` in the main thread; the sweep marks
its run interrupted, keeps its finished rows, shuts down the Ray it started and exits with 128 + the signal's number
(130, 143). A second signal while that happens is ignored: the cleanup is short, and SIGKILL still works.

While the driver waits on Ray's core worker (compiled code, which turns an exception raised inside it into a
SystemError), a signal is only noted (`deferred`), and the driver's loop raises it at its next turn (`check`)."""
from __future__ import annotations

import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A signal asked the command to stop (a BaseException, like KeyboardInterrupt: `except Exception` lets it by)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_pending: int | None = None   # a signal noted while deferred
_deferring = False


def _raise(signum, frame):
    global _pending
    for s in SIGNALS:  # once: the cleanup that follows is not interrupted again
        signal.signal(s, signal.SIG_IGN)
    if _deferring:
        _pending = signum
        return
    raise Interrupted(signum)


def check() -> None:
    """Raise the signal noted while deferred, if any."""
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        raise Interrupted(signum)


@contextmanager
def deferred():
    """Signals inside the block are noted, and raised by `check()` (or at the block's end)."""
    global _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
    check()


def install() -> None:
    """Our handlers (again: ray.init installs its own SIGTERM handler, which exits with code 1)."""
    for s in SIGNALS:
        signal.signal(s, _raise)


@contextmanager
def interruptible():
    """Signals raise Interrupted inside the block; the previous handlers come back after it."""
    before = {s: signal.getsignal(s) for s in SIGNALS}
    install()
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
