"""One sweep per output folder at a time: `<output>/.lock`, held with flock(2) for the whole sweep. The kernel lets go
of a flock when its process ends, however it ends, so a lock whose process is gone is simply taken again; what the
file says (pid, host, run id, start) names the holder to whoever is refused, and names the earlier run when a sweep
takes over a lock that was left behind."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
from datetime import datetime, timezone
from pathlib import Path

from common.untrusted import BadInput, kind_of


class OutputLock:
    def __init__(self, out: Path, run_id: str):
        self.path = Path(out) / ".lock"
        self.run_id = run_id
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Hold the lock, or BadInput naming who holds it. Returns a note when an earlier sweep's lock was left behind
        (its process was killed) and taken over."""
        try:  # a regular file, never through a link (a link planted here would have the lock write anywhere)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            try:
                mode = os.lstat(self.path).st_mode
            except OSError:
                mode = None
            if mode is not None and not stat.S_ISREG(mode):
                raise BadInput(f"output: {self.path} is {kind_of(mode)}; it must be a regular file (move it away)") \
                    from None
            raise BadInput(f"output: cannot open the lock {self.path} ({e.strerror or e})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device opened without blocking
            mode = os.fstat(fd).st_mode
            os.close(fd)
            raise BadInput(f"output: {self.path} is {kind_of(mode)}; it must be a regular file (move it away)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise BadInput(f"output: {self.path.parent} is in use by another sweep ({holder}); wait for it to end, or "
                           f"give this sweep another --output") from None
        left = os.read(fd, 4096)
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                                     "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode())
        except OSError as e:
            os.close(fd)
            raise BadInput(f"output: cannot write the lock {self.path} ({e.strerror or e})") from None
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
