"""Model files read by the driver before anything starts: a GGUF file's metadata, a safetensors file's header, a
folder's config.json, and a model's fingerprint. A model file is untrusted input: every count, length and depth is
checked against a cap and against the bytes the file holds before anything is read or allocated, so a crafted header
fails in milliseconds with one line (BadInput) instead of filling the memory."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import struct
from pathlib import Path

from common.untrusted import BadInput, MiB, parse_json, read_regular_file

CONFIG_CAP = 1 * MiB             # a config.json is a few KB
SAFETENSORS_HEADER_CAP = 16 * MiB  # a 7B model's header is about 30 KB
GGUF_TENSORS = 65536             # the largest GGUF models list a few thousand tensors
GGUF_KEYS = 4096                 # metadata entries (a few dozen in practice)
GGUF_ARRAY_ITEMS = 1 << 20       # one array's items (a 256k-token vocabulary is the largest seen)
GGUF_STRINGS = 1 << 21           # strings in the whole header
GGUF_STRING = 16 * MiB           # one string's bytes
GGUF_DIMS = 8                    # dimensions of one tensor

# GGUF value types: fixed sizes (struct codes); 8 is a string, 9 an array
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_config(folder: Path, field: str) -> dict:
    """A model folder's config.json: a regular file of at most CONFIG_CAP, JSON of bounded depth, a mapping."""
    path = Path(folder) / "config.json"
    config = parse_json(read_regular_file(path, CONFIG_CAP, field), field, f"{path}")
    if not isinstance(config, dict):
        raise BadInput(f"{field}: {path} is not a JSON mapping")
    return config


class _Reader:
    """Little-endian reads from a memory map, each checked against the bytes left."""

    def __init__(self, buf, field: str, path: Path):
        self.buf, self.pos, self.field, self.path = buf, 0, field, path
        self.strings = 0

    def fail(self, why: str) -> BadInput:
        return BadInput(f"{self.field}: {self.path} is not a readable GGUF file ({why})")

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"it ends at byte {len(self.buf)}, inside its header")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, code: str):
        size = struct.calcsize("<" + code)
        return struct.unpack_from("<" + code, self.buf, self.take(size))[0]

    def count(self, what: str, cap: int, min_bytes: int) -> int:
        n = self.unpack("Q")
        left = len(self.buf) - self.pos
        if n > cap or n * min_bytes > left:
            raise self.fail(f"{what} {n:,} is more than {'the cap of ' + format(cap, ',') if n > cap else 'its bytes hold'}")
        return n

    def string(self, read: bool = True) -> str | None:
        self.strings += 1
        if self.strings > GGUF_STRINGS:
            raise self.fail(f"more than {GGUF_STRINGS:,} strings in its header")
        n = self.count("a string's length", GGUF_STRING, 1)
        start = self.take(n)
        if not read:
            return None
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a key or string is not UTF-8") from None

    def _skip_strings(self, n: int) -> None:
        """n strings skipped (a tokenizer's vocabulary: the loop that costs, kept tight)."""
        self.strings += n
        if self.strings > GGUF_STRINGS:
            raise self.fail(f"more than {GGUF_STRINGS:,} strings in its header")
        buf, pos, end, unpack = self.buf, self.pos, len(self.buf), struct.Struct("<Q").unpack_from
        for _ in range(n):
            if pos + 8 > end:
                raise self.fail(f"it ends at byte {end}, inside its header")
            k = unpack(buf, pos)[0]
            pos += 8 + k
            if k > GGUF_STRING:
                raise self.fail(f"a string's length {k:,} is more than the cap of {GGUF_STRING:,}")
        if pos > end:
            raise self.fail(f"it ends at byte {end}, inside its header")
        self.pos = pos

    def value(self, kind: int, keep: bool):
        if kind in _FIXED:
            return self.unpack(_FIXED[kind])
        if kind == _STRING:
            return self.string(keep)
        if kind == _ARRAY:
            item = self.unpack("I")
            if item == _ARRAY:
                raise self.fail("an array of arrays")
            size = struct.calcsize("<" + _FIXED[item]) if item in _FIXED else 8 if item == _STRING else None
            if size is None:
                raise self.fail(f"an array of unknown type {item}")
            n = self.count("an array's length", GGUF_ARRAY_ITEMS, size)
            if item in _FIXED:
                self.take(n * size)  # skipped: only scalars are kept
            else:
                self._skip_strings(n)
            return None
        raise self.fail(f"unknown value type {kind}")


def gguf_header(path: Path, field: str) -> dict:
    """A GGUF file's metadata scalars and tensor shapes, parsed with caps: {"metadata": {key: value}, "tensors":
    [(name, n_elements)], "header_bytes": n, "header_sha256": hex}."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{field}: {path} is not a regular file")
        if st.st_size < 24:
            raise BadInput(f"{field}: {path} is not a GGUF file ({st.st_size} bytes)")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_gguf(buf, field, path)
    except OSError as e:
        raise BadInput(f"{field}: cannot read {path} ({e.strerror or e})") from None


def _parse_gguf(buf, field: str, path: Path) -> dict:
    r = _Reader(buf, field, path)
    if bytes(buf[:4]) != b"GGUF":
        raise BadInput(f"{field}: {path} is not a GGUF file (it does not start with GGUF)")
    r.take(4)
    version = r.unpack("I")
    if version not in (2, 3):
        raise r.fail(f"version {version}; versions 2 and 3 are read")
    n_tensors = r.unpack("Q")
    if n_tensors > GGUF_TENSORS:
        raise r.fail(f"tensor count {n_tensors:,} is more than the cap of {GGUF_TENSORS:,}")
    n_keys = r.unpack("Q")
    if n_keys > GGUF_KEYS:
        raise r.fail(f"metadata count {n_keys:,} is more than the cap of {GGUF_KEYS:,}")
    metadata = {}
    for _ in range(n_keys):
        key = r.string()
        kind = r.unpack("I")
        value = r.value(kind, keep=True)
        if value is not None:
            metadata[key] = value
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = r.unpack("I")
        if dims > GGUF_DIMS:
            raise r.fail(f"a tensor of {dims} dimensions")
        n = 1
        for _ in range(dims):
            n *= r.unpack("Q")
        r.unpack("I")  # type
        r.unpack("Q")  # offset
        tensors.append((name, n))
    header = bytes(buf[:r.pos])
    return {"metadata": metadata, "tensors": tensors, "header_bytes": r.pos,
            "header_sha256": hashlib.sha256(header).hexdigest()}


def safetensors_header(path: Path, field: str) -> bytes:
    """The JSON header of a safetensors file (8-byte length, then the header), its length capped and checked."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise BadInput(f"{field}: {path} is not a safetensors file ({len(raw)} bytes)")
            n = struct.unpack("<Q", raw)[0]
            size = os.fstat(f.fileno()).st_size
            if n > SAFETENSORS_HEADER_CAP or 8 + n > size:
                raise BadInput(f"{field}: {path} is not a readable safetensors file (a header of {n:,} bytes)")
            header = f.read(n)
    except OSError as e:
        raise BadInput(f"{field}: cannot read {path} ({e.strerror or e})") from None
    if not isinstance(parse_json(header, field, f"the header of {path}"), dict):
        raise BadInput(f"{field}: {path} is not a readable safetensors file (its header is not a mapping)")
    return header


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(source: str, location: str, field: str) -> str | None:
    """What identifies a local model's weights, hashed: for a folder, its config.json and each weight file's size,
    modification time and (safetensors) header; for a GGUF file, its size, modification time and header. A model
    changed in place gets a new fingerprint, and so new cell keys. None for hub and synthetic models (their id, revision or shapes identify them)."""
    h = hashlib.sha256()
    if source == "gguf":
        path = Path(location)
        head = gguf_header(path, field)
        h.update(json.dumps({"header": head["header_sha256"], **_file_identity(path)}).encode())
        return h.hexdigest()[:16]
    if source == "path":
        folder = Path(location)
        h.update(read_regular_file(folder / "config.json", CONFIG_CAP, field))
        for f in sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file()):
            h.update(json.dumps({"name": f.name, **_file_identity(f)}).encode())
            if f.name.endswith(".safetensors"):
                h.update(safetensors_header(f, field))
        return h.hexdigest()[:16]
    return None
