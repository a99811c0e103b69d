"""Calibrated quantization (GPTQ, AWQ) through gptqmodel 7.6, cached on disk.

A calibrated model is built once per (source folder, method, options, calibration data, gptqmodel version) into
$QSWEEP_CACHE/<method>-<key>/ (a transformers checkpoint with its GPTQConfig/AwqConfig), with `calibration.json`
beside it saying how long calibration took and on what; later units load it with from_pretrained and report the
recorded calibration time with `calibration_cached` true.

Calibration samples: `samples` windows of `seqlen` tokens at seeded random offsets (seed 0) in the tokenized
calibration text, as the GPTQ paper samples its calibration set. A model without a tokenizer (synthetic weights) is
calibrated on seeded random token ids: enough to measure speed and memory, meaningless for quality.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from common.catalog import RANDOM_IDS
from common.models import widths_of
from tasks.precisions.gptq import machete_picked, shape_problem
from common.cache import cache_root
from tasks.sources import publish


def calibration_ids(text: bytes | None, tokenizer, vocab: int, samples: int, seqlen: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    if text is None or tokenizer is None:
        ids = torch.randint(0, vocab, (samples, seqlen), generator=g)
    else:
        tokens = torch.tensor(tokenizer(text.decode("utf-8"), add_special_tokens=False).input_ids)
        if tokens.numel() <= seqlen:
            raise ValueError(f"calibration text has {tokens.numel()} tokens, fewer than calib_seqlen {seqlen}")
        starts = torch.randint(0, tokens.numel() - seqlen, (samples,), generator=g)
        ids = torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])
    return [{"input_ids": row.tolist(), "attention_mask": [1] * seqlen} for row in ids]


def _word_level_tokenizer(folder: Path, vocab: int) -> None:
    """gptqmodel insists on loading a tokenizer; a synthetic model gets a word-level one over its vocabulary."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(folder)


def _quantize_config(method: str, opts) -> Any:
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    common = dict(bits=opts.bits, group_size=opts.group_size, offload_to_disk=False)
    if method == "awq":
        return QuantizeConfig(method=METHOD.AWQ, format=FORMAT.GEMM, **common)
    return QuantizeConfig(desc_act=opts.act_order, sym=opts.sym, **common)


def quant_config_text(method: str, opts) -> str:
    if method == "awq":
        return (f"gptqmodel QuantizeConfig(method=AWQ, format=GEMM, bits={opts.bits}, group_size={opts.group_size}); "
                f"loaded by transformers (AwqConfig)")
    return (f"gptqmodel QuantizeConfig(method=GPTQ, bits={opts.bits}, group_size={opts.group_size}, "
            f"desc_act={opts.act_order}, sym={opts.sym}); loaded by transformers (GPTQConfig)")


def import_gptqmodel():
    """Import gptqmodel without letting it change this process: at import it sets PYTORCH_ALLOC_CONF (expandable
    segments, which would change every memory figure against the other precisions) and CUDA_DEVICE_ORDER when they
    are unset. Both are pinned to what every other unit runs with before the import; it also needs a CPU worker
    count on small machines."""
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:False")
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, len(os.sched_getaffinity(0)))))
    import gptqmodel

    return gptqmodel


def github_reachable(timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection(("github.com", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _cutlass_at_hand() -> bool:
    """Whether gptqmodel can build Machete without a download: a CUTLASS checkout or prebuilt library named in its
    environment variables, or its own cache of the CUTLASS sources (private paths: False if they moved)."""
    if os.environ.get("GPTQMODEL_MACHETE_PRECOMPILED_LIBRARY") or os.environ.get("GPTQMODEL_CUTLASS_DIR"):
        return True
    try:
        from gptqmodel.utils import machete
        return (machete._cutlass_cache_dir().is_dir() or machete._cutlass_archive_path().is_file()
                or machete._repo_local_cutlass_root().is_dir())
    except (ImportError, AttributeError):
        return False


def machete_problem(method: str, opts, capability: tuple[int, int] | None, reachable=github_reachable) -> str | None:
    """Machete builds itself at first use (nvcc) from CUTLASS sources that gptqmodel downloads from GitHub: on a host
    that cannot reach it, the load fails after calibrating (URLError, seen on an H200). Checked in the worker, before
    calibrating, since only the worker's host knows its network and cache."""
    if not machete_picked(method, opts, capability) or _cutlass_at_hand() or reachable():
        return None
    return (f"gptq: with kernel auto, gptqmodel 7.6 loads {opts.bits}-bit GPTQ on compute capability 9.0 with its "
            f"Machete kernel, which builds itself at first use from CUTLASS sources downloaded from github.com; "
            f"none is cached on this host and github.com cannot be reached; choose another kernel (`kernel: marlin` "
            f"or `kernel: torch`), or set GPTQMODEL_CUTLASS_DIR to a CUTLASS v4.7.1 checkout")


@contextmanager
def calibration_log_in(folder: Path):
    """gptqmodel 7.6 writes its per-layer quantization log (loss, samples, time per module) to ./logs, wherever the
    sweep was started; send it to the calibrated checkpoint instead (a private module path: left alone if it moved)."""
    try:
        from gptqmodel.looper import loop_processor
        before = loop_processor._PROJECT_LOG_DIR
    except (ImportError, AttributeError):
        yield
        return
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = before


def quantized_folder(source: str, method: str, opts, device: str, text: bytes | None, text_name: str | None,
                     synthetic: bool) -> tuple[str, dict]:
    """The cached calibrated checkpoint of `source` (built now if missing), and the calibration facts for the row."""
    capability = None
    if device.startswith("cuda"):
        capability = tuple(torch.cuda.get_device_capability(device))
    config = AutoConfig.from_pretrained(source)
    problem = shape_problem(method, opts, widths_of(config), capability)
    if problem:  # before calibrating, and before loading a cached checkpoint the kernel could not take
        raise ValueError(problem)
    gptqmodel = import_gptqmodel()
    problem = machete_problem(method, opts, capability)
    if problem:
        raise RuntimeError(problem)
    calib = {k: v for k, v in opts.model_dump().items() if k not in ("calib_path", "kernel")}
    data = RANDOM_IDS if synthetic or text is None else hashlib.sha256(text).hexdigest()
    identity = {"source": str(Path(source).resolve()) if Path(source).exists() else source, "method": method,
                "options": calib, "calibration_data": data, "gptqmodel": gptqmodel.__version__}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / f"{method}-{key}"
    built_here = not (target / "config.json").exists()

    def build(tmp: Path) -> None:
        from gptqmodel import BACKEND, GPTQModel

        staging = tmp / "source"  # the source files by link, plus a tokenizer where it has none
        staging.mkdir()
        src = Path(source)
        for f in src.iterdir():
            (staging / f.name).symlink_to(f.resolve())
        vocab = config.get_text_config().vocab_size
        tokenizer = None
        if synthetic or text is None:
            if not any(src.glob("tokenizer*")):
                _word_level_tokenizer(staging, vocab)
        else:
            tokenizer = AutoTokenizer.from_pretrained(src)
        samples = calibration_ids(None if synthetic else text, tokenizer, vocab, opts.calib_samples,
                                  opts.calib_seqlen)
        t0 = time.perf_counter()
        with calibration_log_in(tmp / "calibration-log"):
            model = GPTQModel.load(str(staging), _quantize_config(method, opts), device=device)
            model.quantize(samples, batch_size=1, backend=BACKEND.TORCH if device == "cpu" else BACKEND.AUTO)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        calibration_s = time.perf_counter() - t0
        out = tmp / "model"
        model.save(str(out))
        del model
        for f in out.iterdir():
            f.rename(tmp / f.name)
        out.rmdir()
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
        (tmp / "calibration.json").write_text(json.dumps({
            **identity, "calibration_s": calibration_s, "device": device,
            "calib_text": RANDOM_IDS if synthetic or text is None else text_name}))

    publish(build, target)
    record = json.loads((target / "calibration.json").read_text())
    return str(target), {
        "calibration_s": record["calibration_s"], "calibration_cached": not built_here,
        "calibration_device": record.get("device"), "calib_text": record["calib_text"],
        "calib_sha256": None if data == RANDOM_IDS else data, "calib_samples": opts.calib_samples,
        "calib_seqlen": opts.calib_seqlen, "calibrated_folder": str(target)}
