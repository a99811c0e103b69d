"""Files the driver reads for the user (the grid, the WikiText-2 test file, calibration text): each must be a
regular file no larger than a cap, checked before it is opened, so that `/dev/zero` cannot fill the memory and a FIFO
cannot hang the sweep. Every problem is one BadInput naming the field and the file."""
from __future__ import annotations

import os
import stat
from pathlib import Path

MiB = 1 << 20
GRID_CAP = 1 * MiB          # a grid is a few KB
TEXT_CAP = 64 * MiB         # WikiText-2's test split is 1.3 MB, its validation split 1.1 MB


class BadInput(Exception):
    """Bad input: one line naming the field or file; the CLI prints it and exits with code 2."""


KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def expand(path: str | Path, base_dir: Path | None = None) -> Path:
    """`~` expanded, then made absolute against `base_dir` (the grid file's folder) when relative."""
    p = Path(path).expanduser()
    return (base_dir / p) if base_dir is not None and not p.is_absolute() else p


def read_regular_file(path: Path, cap: int, field: str, hint: str = "") -> bytes:
    """The bytes of a regular file of at most `cap` bytes; BadInput naming `field` otherwise."""
    tail = f"; {hint}" if hint else ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{field}: {path} does not exist{tail}") from None
    except OSError as e:
        raise BadInput(f"{field}: cannot read {path} ({e.strerror}){tail}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in KINDS if test(st.st_mode)), "not a regular file")
        raise BadInput(f"{field}: {path} is {kind}, not a regular file{tail}")
    if st.st_size > cap:
        raise BadInput(f"{field}: {path} is {st.st_size / MiB:.1f} MiB, more than the {cap / MiB:g} MiB read here{tail}")
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)  # a file that grows, or lies about its size (/proc), is still capped
    except OSError as e:
        raise BadInput(f"{field}: cannot read {path} ({e.strerror}){tail}") from None
    if len(data) > cap:
        raise BadInput(f"{field}: {path} holds more than the {cap / MiB:g} MiB read here{tail}")
    return data
