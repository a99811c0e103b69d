"""The trust boundary: a grid, a results folder and a model file are untrusted input.

Text a user or a results folder supplies (labels, paths, messages) is shown as plain text: control characters
escaped (`plain`), never read as markup by rich, HTML or matplotlib.

Reads of files a user names (a grid, WikiText-2, calibration text, a model's headers,
a results folder's manifest): regular files only, no larger than a cap, checked before they are opened, so that
`/dev/zero` cannot fill the memory and a FIFO cannot hang the sweep; JSON of bounded depth.

Writes into an output folder that land where they say. An output folder is untrusted: a link planted in it must
not make a sweep or a report write anywhere else. So files are created beside their target under a fresh name
(O_CREAT | O_EXCL | O_NOFOLLOW, relative to the folder's descriptor) and renamed over it, which replaces a link
rather than following it; folders inside the output folder are opened with O_NOFOLLOW; and anything but a regular file
(a link, a folder, a FIFO) where a file is to be written is refused with one line."""
from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path


class BadInput(Exception):
    """Bad input: one line naming the field or file; the CLI prints it and exits with code 2."""


MiB = 1 << 20
GRID_CAP = 1 * MiB          # a grid is a few KB
TEXT_CAP = 64 * MiB         # WikiText-2's test split is 1.3 MB, its validation split 1.1 MB
MANIFEST_CAP = 64 * MiB     # sweep.json lists every cell key of a grid (20 characters each)
JSON_DEPTH = 64             # nesting deeper than this in a JSON file is refused


KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISLNK, "a link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


# C0 and C1 controls, DEL; line and paragraph separators and the bidirectional overrides (text that reads backwards)
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]} | {
    c: f"\\u{c:04x}" for c in [0x200e, 0x200f, *range(0x2028, 0x202f), *range(0x2066, 0x206a)]}


_MULTILINE = {k: v for k, v in _CONTROL.items() if k != 0x0a}


def plain(text, lines: bool = False) -> str:
    """`text` with control characters written as escapes (\\x1b), so that it cannot clear a terminal, set its
    title or break a line where it is printed; tabs and newlines too (one value is one line), unless `lines` (a
    traceback keeps its newlines)."""
    return str(text).translate(_MULTILINE if lines else _CONTROL)


def kind_of(mode: int) -> str:
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


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
        raise BadInput(f"{field}: {path} is {kind_of(st.st_mode)}, not a regular file{tail}")
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


def json_depth_ok(text: str, limit: int = JSON_DEPTH) -> bool:
    """Whether brackets nest at most `limit` deep (strings skipped): checked before json.loads, which recurses."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_json(data: bytes, field: str, what: str) -> object:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{field}: {what} is not UTF-8 text") from None
    if not json_depth_ok(text):
        raise BadInput(f"{field}: {what} nests deeper than {JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as e:
        raise BadInput(f"{field}: {what} is not valid JSON ({e})") from None


def open_folder(path: Path, create: bool = True) -> int:
    """A descriptor of `path`, made if missing. The folder a user names may be a link (their choice); use `subfolder`
    for folders inside it."""
    path = Path(path)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except NotADirectoryError:
        raise BadInput(f"{path} is {kind_of(os.lstat(path).st_mode)}, not a folder") from None


def subfolder(parent_fd: int, name: str, where: Path, create: bool = True) -> int:
    """A descriptor of the folder `name` inside `parent_fd` (made if missing), never through a link."""
    if create:
        try:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except (NotADirectoryError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        try:
            mode = os.lstat(name, dir_fd=parent_fd).st_mode
        except OSError:
            raise e from None
        if stat.S_ISDIR(mode):
            raise
        raise BadInput(f"{where / name} is {kind_of(mode)}; it must be a folder (move it away)") from None


def check_file_slot(dir_fd: int, name: str, where: Path) -> None:
    """Nothing, or a regular file, stands at `name`: else one line (a link, folder or FIFO is never written through)."""
    try:
        mode = os.lstat(name, dir_fd=dir_fd).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise BadInput(f"{where / name} is {kind_of(mode)}; it must be a regular file (move it away)")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def replace_file(dir_fd: int, name: str, data: bytes, where: Path, mode: int = 0o644) -> None:
    """Write `data` to `name` in the folder: a fresh temporary file beside it, renamed over it (a reader sees the old
    file or the new one, never half; a link at `name` is refused, and one planted meanwhile is replaced, not
    followed). OSError (full disk, read-only) is the caller's."""
    check_file_slot(dir_fd, name, where)
    tmp = f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def write_into(folder: Path, name: str, data: bytes, create: bool = True) -> Path:
    """replace_file into `folder` (a path the user named), for one-off writes (the report)."""
    fd = open_folder(folder, create)
    try:
        replace_file(fd, name, data, Path(folder))
    finally:
        os.close(fd)
    return Path(folder) / name
