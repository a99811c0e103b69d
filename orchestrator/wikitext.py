"""Where the WikiText-2 raw test split comes from: the grid's `perplexity.path`, else $WIKITEXT2_PATH, else the hub.
A local file is read by the driver, checked against its known sha256 and shipped to workers through Ray's object
store, so worker nodes need no copy. Offline with neither, the sweep stops at once with a message saying what to set.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

from orchestrator.grid import GridError
from tasks.perplexity import HUB_DATASET, WIKITEXT2_TEST_SHA256

HINT = ("point at a local copy of the raw test split (wiki.test.raw from wikitext-2-raw-v1), e.g. "
        "`--set perplexity.path=../shared/data/wikitext-2-raw/wiki.test.raw` or "
        "`export WIKITEXT2_PATH=../shared/data/wikitext-2-raw/wiki.test.raw`, or turn it off with "
        "`--set perplexity=false`")


def _offline() -> bool:
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return False
    except OSError:
        return True


def _read(path: str, base_dir: Path, field: str, hint: str) -> tuple[Path, bytes, str]:
    file = (base_dir / Path(path).expanduser()).resolve()
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise GridError(f"{field}: cannot read {file} ({e.strerror}); {hint}")
    return file, raw, hashlib.sha256(raw).hexdigest()


def resolve(path: str | None, base_dir: Path) -> tuple[bytes | None, dict]:
    """(bytes of the local file or None for the hub, {"dataset", "sha256"} for the rows)."""
    field = "perplexity.path"
    if path is None and os.environ.get("WIKITEXT2_PATH"):
        path, field, base_dir = os.environ["WIKITEXT2_PATH"], "WIKITEXT2_PATH", Path.cwd()
    if path is not None:
        file, raw, sha = _read(path, base_dir, field, HINT)
        if sha != WIKITEXT2_TEST_SHA256:
            raise GridError(f"{field}: {file} is not the WikiText-2 raw test split (sha256 {sha[:12]}…, expected "
                            f"{WIKITEXT2_TEST_SHA256[:12]}…); perplexities from it would not be comparable")
        return raw, {"dataset": str(file), "sha256": sha}
    if _offline():
        raise GridError(f"perplexity: no local WikiText-2 file is set and the Hugging Face hub is out of reach; {HINT}")
    return None, {"dataset": f"hub:{HUB_DATASET}", "sha256": None}


VALID_HINT = ("set the precision's calib_path or $WIKITEXT2_VALID_PATH to calibration text, e.g. the WikiText-2 "
              "validation split ../shared/data/wikitext-2/wiki.valid.tokens")
HUB_VALIDATION = "hub:wikitext/wikitext-2-raw-v1/validation"


def calibration(path: str | None, base_dir: Path, field: str) -> tuple[bytes | None, dict]:
    """Calibration text for gptq/awq: the precision's `calib_path`, else $WIKITEXT2_VALID_PATH, else the hub's
    WikiText-2 validation split (fetched by the worker). Never the test split: calibrating on the text perplexity is
    measured on would flatter the method. Returns (bytes or None for the hub, {"name", "sha256"})."""
    if path is None and os.environ.get("WIKITEXT2_VALID_PATH"):
        path, field, base_dir = os.environ["WIKITEXT2_VALID_PATH"], "WIKITEXT2_VALID_PATH", Path.cwd()
    if path is None:
        if _offline():
            raise GridError(f"{field}: no calibration text is set and the Hugging Face hub is out of reach; "
                            f"{VALID_HINT}")
        return None, {"name": HUB_VALIDATION, "sha256": None}
    file, raw, sha = _read(path, base_dir, field, VALID_HINT)
    if sha == WIKITEXT2_TEST_SHA256:
        raise GridError(f"{field}: {file} is the WikiText-2 test split, on which perplexity is measured; calibrating "
                        f"on it would flatter the method; {VALID_HINT}")
    return raw, {"name": str(file), "sha256": sha}
