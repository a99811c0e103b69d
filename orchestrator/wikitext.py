"""Where the WikiText-2 raw test split comes from: the grid's `perplexity.path`, else $WIKITEXT2_PATH, else the hub.
A local file is read by the driver, checked against its known sha256 and shipped to workers through Ray's object
store, so worker nodes need no copy. Offline with neither, the sweep stops at once with a message saying what to set.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.untrusted import TEXT_CAP, BadInput, expand, read_regular_file
from orchestrator.model_info import hub_offline
from tasks.precisions import REGISTRY
from common.catalog import HUB_DATASET, HUB_VALIDATION, WIKITEXT2_TEST_SHA256

HINT = ("point at a local copy of the raw test split (wiki.test.raw from wikitext-2-raw-v1): "
        "`export WIKITEXT2_PATH=../shared/data/wikitext-2-raw/wiki.test.raw` (relative to where you run the command), "
        "or `perplexity.path` in the grid (relative to the grid file's folder; an absolute path works from anywhere), "
        "or turn it off with `--set perplexity=false`")


def _read(path: str, base_dir: Path, field: str, hint: str) -> tuple[Path, bytes, str]:
    """A relative path is relative to the grid file's folder (to the working folder for environment variables)."""
    file = expand(path, base_dir).resolve()
    raw = read_regular_file(file, TEXT_CAP, field, hint)
    return file, raw, hashlib.sha256(raw).hexdigest()


def resolve(path: str | None, base_dir: Path) -> tuple[bytes | None, dict]:
    """(bytes of the local file or None for the hub, {"dataset", "sha256"} for the rows)."""
    field = "perplexity.path"
    if path is None and os.environ.get("WIKITEXT2_PATH"):
        path, field, base_dir = os.environ["WIKITEXT2_PATH"], "WIKITEXT2_PATH", Path.cwd()
    if path is not None:
        file, raw, sha = _read(path, base_dir, field, HINT)
        if sha != WIKITEXT2_TEST_SHA256:
            raise BadInput(f"{field}: {file} is not the WikiText-2 raw test split (sha256 {sha[:12]}…, expected "
                            f"{WIKITEXT2_TEST_SHA256[:12]}…); perplexities from it would not be comparable")
        return raw, {"dataset": str(file), "sha256": sha}
    if hub_offline():
        raise BadInput(f"perplexity: no local WikiText-2 file is set and the Hugging Face hub is out of reach; {HINT}")
    return None, {"dataset": f"hub:{HUB_DATASET}", "sha256": None}


VALID_HINT = ("set the precision's calib_path or $WIKITEXT2_VALID_PATH to calibration text, e.g. the WikiText-2 "
              "validation split ../shared/data/wikitext-2/wiki.valid.tokens")


def calibration(path: str | None, base_dir: Path, field: str) -> tuple[bytes | None, dict]:
    """Calibration text for gptq/awq: the precision's `calib_path`, else $WIKITEXT2_VALID_PATH, else the hub's
    WikiText-2 validation split (fetched by the worker). Never the test split: calibrating on the text perplexity is
    measured on would flatter the method. Returns (bytes or None for the hub, {"name", "sha256"})."""
    if path is None and os.environ.get("WIKITEXT2_VALID_PATH"):
        path, field, base_dir = os.environ["WIKITEXT2_VALID_PATH"], "WIKITEXT2_VALID_PATH", Path.cwd()
    if path is None:
        if hub_offline():
            raise BadInput(f"{field}: no calibration text is set and the Hugging Face hub is out of reach; "
                            f"{VALID_HINT}")
        return None, {"name": HUB_VALIDATION, "sha256": None}
    file, raw, sha = _read(path, base_dir, field, VALID_HINT)
    if sha == WIKITEXT2_TEST_SHA256:
        raise BadInput(f"{field}: {file} is the WikiText-2 test split, on which perplexity is measured; calibrating "
                        f"on it would flatter the method; {VALID_HINT}")
    return raw, {"name": str(file), "sha256": sha}


@dataclass
class Texts:
    """The texts a sweep reads before anything starts: the WikiText-2 test split (bytes, or None for the hub) with
    where it came from, and each calibrated precision's calibration text by its index in the grid."""
    test: bytes | None = None
    test_source: dict | None = None
    calibration: dict[int, tuple[bytes | None, dict]] = field(default_factory=dict)


def read_texts(grid) -> Texts:
    """Every text file the grid names, read and checked now (regular files, capped, the right split)."""
    texts = Texts()
    if grid.perplexity:
        texts.test, texts.test_source = resolve(grid.perplexity.path, grid._base_dir)
    for j, p in enumerate(grid.precisions):  # calibration text, read and checked once (never the test split)
        if REGISTRY[p.name].calibrated and any(not m.synthetic for m in grid.models):
            texts.calibration[j] = calibration(p.options.get("calib_path"), grid._base_dir,
                                               f"precisions[{j}].calib_path")
    return texts
