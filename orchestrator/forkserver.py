"""Run one unit in a fresh process forked from a warm fork server.

Each unit needs a process of its own: a clean CUDA context and clean peak-memory counters, and a broken context
cannot poison the next unit. Starting a fresh Python per unit costs seconds (importing torch and transformers, and
under Ray the worker's own start-up), so the caller (a long-lived Ray worker) keeps a fork server per process that has
imported the runner module and its `PRELOAD` list once, and forks a child from it for each unit:

- the fork server never initialises CUDA (importing torch does not), so every child starts its own context;
- the child gets the caller's environment at the time of the call, CUDA_VISIBLE_DEVICES included, before it touches
  a GPU: the GPU is the one the caller was given for this unit, not the one it had when the server started;
- the child dies with the fork server (PR_SET_PDEATHSIG), and the server dies with the caller: a cancelled or killed
  caller takes the measurement with it;
- rows travel through a pipe one by one; an exception in the child is re-raised in the caller with the child's
  traceback attached (`child_traceback`); a child that dies without finishing raises `UnitProcessDied`.

Process plumbing of the driver's side (the Ray worker calls it); no Ray here.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import traceback
import types

_context = None


class UnitProcessDied(RuntimeError):
    """The unit's process ended (killed, crashed, out of host memory) before its last row."""


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the server died between fork and prctl
        os._exit(1)


def _child(conn, runner: str, unit, wikitext: bytes | None, env: dict) -> None:
    _die_with_parent()
    os.environ.clear()
    os.environ.update(env)
    module, _, fn = runner.partition(":")
    try:
        for row in getattr(importlib.import_module(module), fn)(unit, wikitext):
            conn.send(("row", row))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
        text = "".join(traceback.format_exception(exc))
        try:
            conn.send(("error", exc, text))
        except Exception:  # the exception does not pickle: send its type, message and traceback instead
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), text))
        return
    conn.send(("done",))


def fork_context(runner: str):
    """The fork-server context of this process, started on first use with the runner's module preloaded."""
    global _context
    if _context is None:
        module = importlib.import_module(runner.partition(":")[0])
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, module.__name__, *getattr(module, "PRELOAD", ())])
        _context = ctx
    return _context


def start(runner: str, unit, wikitext: bytes | None):
    """Fork the unit's process; returns (process, connection). Read rows with `rows(process, connection)`."""
    ctx = fork_context(runner)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, runner, unit, wikitext, dict(os.environ)), daemon=True,
                       name=f"unit {getattr(unit, 'unit_id', '')}")
    # multiprocessing re-runs the caller's main script in the child when __main__ is a file (under Ray that is the
    # worker's default_worker.py, which imports Ray: a second per unit); the child needs nothing from it
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        proc.start()
    finally:
        sys.modules["__main__"] = main
    send.close()
    return proc, recv


def rows(proc, recv):
    """Yield the child's rows as they come; re-raise its exception; raise UnitProcessDied if it vanished."""
    finished = False
    try:
        while True:
            try:
                message = recv.recv()
            except EOFError:
                proc.join(5)
                code = proc.exitcode
                how = (f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
                       else f"exit code {code}")
                raise UnitProcessDied(f"the unit's process (pid {proc.pid}) ended before its last row: {how}")
            if message[0] == "row":
                yield message[1]
            elif message[0] == "error":
                exc = message[1]
                exc.child_traceback = message[2]
                raise exc
            else:
                finished = True
                return
    finally:
        recv.close()
        proc.join(30 if finished else 0)
        if proc.exitcode is None:  # abandoned (the caller stopped reading) or stuck after its last row
            proc.kill()
            proc.join()
