"""One sweep per output folder at a time: `<output>/.lock`, held with flock(2) for the whole sweep. The kernel lets go
of a flock when its process ends, however it ends, so a lock whose process is gone is simply taken again; what the
file says (pid, host, run id, start) names the holder to whoever is refused, and names the earlier run when a sweep
takes over a lock that was left behind."""
from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.files import BadInput


class OutputLock:
    def __init__(self, out: Path, run_id: str):
        self.path = Path(out) / ".lock"
        self.run_id = run_id
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Hold the lock, or BadInput naming who holds it. Returns a note when an earlier sweep's lock was left behind
        (its process was killed) and taken over."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise BadInput(f"output: {self.path.parent} is in use by another sweep ({holder}); wait for it to end, or "
                           f"give this sweep another --output") from None
        left = os.read(fd, 4096)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                                 "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode())
        self.fd = fd
        return f"took over the lock of an earlier sweep whose process is gone ({_describe(left)})" if left else None

    def release(self) -> None:
        """Empty the file and let go (the file stays: removing it could let two later sweeps lock two files)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _describe(raw: bytes) -> str:
    try:
        d = json.loads(raw)
        return f"pid {d['pid']} on {d['host']}, run {d['run_id']}, since {d['started_at']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
