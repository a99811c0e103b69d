"""SIGINT (Ctrl-C) and SIGTERM (what `ray job stop`, systemd and Kubernetes send) are an interruption wherever they
come: Ray starting, a unit running, the report rendering. Both raise `Interrupted` in the main thread; the sweep marks
its run interrupted, keeps its finished rows, shuts down the Ray it started and exits with 128 + the signal's number
(130, 143). A second signal while that happens is ignored: the cleanup is short, and SIGKILL still works.

While the driver waits on Ray's core worker (compiled code, which turns an exception raised inside it into a
SystemError), a signal is only noted (`deferred`), and the driver's loop raises it at its next turn (`check`). A
signal stays noted until whoever catches `Interrupted` calls `clear()`: one raised where Python cannot pass it on (a
finalizer or weakref callback, which only print what they raise) is raised again at the next `check()`, silently."""
from __future__ import annotations

import os
import signal
import sys
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
    _pending = signum
    if not _deferring:
        raise Interrupted(signum)


def _unraisable(info, default=sys.unraisablehook) -> None:
    """An Interrupted that a finalizer swallowed stays noted (check() raises it); anything else as Python prints it."""
    if not isinstance(info.exc_value, Interrupted):
        default(info)


def check() -> None:
    """Raise the signal noted (while deferred, or swallowed where it was raised), if any."""
    if _pending is not None:
        raise Interrupted(_pending)


def clear() -> None:
    """The Interrupted raised has been caught and handled: forget the signal."""
    global _pending
    _pending = None


@contextmanager
def _noted():
    """Signals inside the block are only noted (`_pending`), never raised there."""
    global _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = False


@contextmanager
def deferred():
    """Signals inside the block are noted, and raised by `check()` (or at the block's end)."""
    with _noted():
        yield
    check()  # (reached only when the block ended without an exception)


@contextmanager
def finishing():
    """The command's last cleanup (closing its files, stopping the Ray it started) runs to its end: a signal inside
    it is noted and forgotten, and the command exits with what it had (a finished sweep: 0)."""
    try:
        with _noted():
            yield
    finally:
        clear()


def install() -> None:
    """Our handlers (again: ray.init installs its own SIGTERM handler, which exits with code 1)."""
    for s in SIGNALS:
        signal.signal(s, _raise)
    sys.unraisablehook = _unraisable


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


def exit_with(code: int) -> None:
    """The command's exit, once its work and cleanup are done (rows, manifest, Ray). A signal from here on finds the
    command finished: it is ignored, not raised into the interpreter's teardown (Ray's exit handlers), which would
    print a traceback. After an interruption the process leaves without that teardown, where a C extension's thread
    the signal caught mid-call (Ray's core worker, while it starts) can crash and turn 130 or 143 into a segfault."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if code in (128 + s for s in SIGNALS):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
