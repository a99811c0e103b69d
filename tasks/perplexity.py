"""WikiText-2 (raw, test split) perplexity under a named protocol.

Data: the hub dataset (wikitext / wikitext-2-raw-v1 / test, through `datasets`) or a local `wiki.test.raw` whose bytes
the driver has read and checked against WIKITEXT2_TEST_SHA256. Rows are made exactly as the hub builder makes them from
that file (a blank line gives "", any other line is kept with its trailing "\\n"), joined with "\\n\\n" and tokenized once
with the model's tokenizer, special tokens as it adds them by default.

Protocols (every row records protocol, seqlen, stride, windows and tokens scored):
- `gptq`: non-overlapping windows of `seqlen`, the tail dropped; each window's mean cross-entropy over its seqlen-1
  shifted targets, times seqlen, summed; ppl = exp(sum / (windows * seqlen)). GPTQ paper, Table 3 (OPT-125M: 27.65).
- `strided`: Hugging Face's "perplexity of fixed-length models": windows of `seqlen` every `stride` tokens, each token
  scored once, by the first window that scores it, conditioned on up to seqlen-1 tokens before it; ppl = exp(total
  cross-entropy / tokens scored). Unlike the guide's code, every token 1..N-1 is weighted exactly once.

Windows go through the model `batch_size` at a time; the loss is summed in fp32 over chunks of positions so that fp32
logits for a whole batch never exist at once.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.cache import cache_root
from common.stats import paired_log_ratio, perplexity_interval
from tasks.distance import Capture, Reference, check_head, windows_digest

LOSS_CHUNK = 512  # positions per fp32 cross-entropy chunk


def rows_from_raw(raw: bytes) -> list[str]:
    """The rows the hub's wikitext builder yields for a raw split file."""
    lines = raw.decode("utf-8").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def hub_rows() -> list[str]:
    import datasets

    return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])


def corpus_text(rows: list[str]) -> str:
    return "\n\n".join(rows)


def token_ids(tokenizer, text: str):
    """The text tokenized once, as the tokenizer does by default. Cached on disk by (tokenizer definition, text):
    every unit of a model tokenizes the same split with the same tokenizer (1.6 s on the H200 host, more than the
    batched forward pass over the whole split)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # not a fast tokenizer: no stable definition to key the cache by
        return tokenizer(text, return_tensors="pt").input_ids[0]
    key = hashlib.sha256(backend.to_str().encode() + b"\0" + text.encode()).hexdigest()[:24]
    path = cache_root() / "tokens" / f"{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, ids.numpy())
    os.replace(tmp, path)
    return ids


@dataclass(frozen=True)
class Window:
    begin: int       # first input token (index into the token stream)
    end: int         # one past the last input token
    score_from: int  # first target position scored, relative to begin (>= 1)


def gptq_windows(n_tokens: int, seqlen: int) -> list[Window]:
    return [Window(i * seqlen, (i + 1) * seqlen, 1) for i in range(n_tokens // seqlen)]


def strided_windows(n_tokens: int, seqlen: int, stride: int) -> list[Window]:
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seqlen, n_tokens)
        first_new = max(prev_end, begin + 1)  # token 0 has no context; later windows score only what is new
        if end - begin >= 2 and first_new < end:
            windows.append(Window(begin, end, first_new - begin))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def window_losses(model, ids, windows: list[Window], batch_size: int, device: str, capture: Capture | None = None,
                  reference: Reference | None = None) -> list[tuple[float, int]]:
    """(sum of cross-entropy in fp32, number of targets) per window, windows of equal length batched together;
    `model`: a loaded model (tasks.engines.Model). `capture`: keep the hidden states the output head reads (the
    baseline, making its reference; its logits are then computed from exactly those); `reference`: add the distance
    of each scored position's distribution to the baseline's."""
    out: dict[int, tuple[float, int]] = {}
    order = sorted(range(len(windows)), key=lambda i: windows[i].end - windows[i].begin)
    groups: list[list[int]] = []
    for i in order:
        length = windows[i].end - windows[i].begin
        if groups and len(groups[-1]) < batch_size and \
                windows[groups[-1][0]].end - windows[groups[-1][0]].begin == length:
            groups[-1].append(i)
        else:
            groups.append([i])
    with torch.no_grad():  # not inference_mode: quanto's packed int4/int2 weights fail under it; one mode for all
        for group in groups:
            batch = torch.stack([ids[windows[i].begin:windows[i].end] for i in group]).to(device)
            if capture is not None:
                hidden = model.hidden_states(batch)
                logits = F.linear(hidden, *model.output_head())
                for row, i in enumerate(group):
                    capture.add(i, hidden[row])
                del hidden
            else:
                logits = model.logits(batch)
            for row, i in enumerate(group):
                w = windows[i]
                total = torch.zeros((), dtype=torch.float64, device=logits.device)
                for lo in range(w.score_from, w.end - w.begin, LOSS_CHUNK):
                    hi = min(lo + LOSS_CHUNK, w.end - w.begin)
                    chunk, targets = logits[row, lo - 1:hi - 1].float(), batch[row, lo:hi]
                    total += F.cross_entropy(chunk, targets, reduction="sum").double()
                    if reference is not None:
                        reference.add(i, lo, hi, chunk, targets)
                out[i] = (float(total), w.end - w.begin - w.score_from)
            del logits
    return [out[i] for i in range(len(windows))]


def perplexity(model, tokenizer, rows: list[str], *, protocol: str, seqlen: int, stride: int,
               max_windows: int | None, batch_size: int, device: str, capture: Capture | None = None,
               reference: Reference | None = None) -> dict:
    """Perplexity with its 95% interval and the per-window losses; with `reference`, the distance to the baseline
    on the same windows; with `capture`, the hidden states for this precision's own reference."""
    t0 = time.perf_counter()
    ids = token_ids(tokenizer, corpus_text(rows))
    max_len = model.max_positions
    if max_len and seqlen > max_len:
        raise ValueError(f"perplexity.seqlen {seqlen} exceeds the model's max_position_embeddings {max_len}")
    if protocol == "gptq":
        windows = gptq_windows(len(ids), seqlen)
    elif protocol == "strided":
        windows = strided_windows(len(ids), seqlen, stride)
    else:
        raise ValueError(f"unknown perplexity protocol {protocol!r}")
    if max_windows is not None:
        windows = windows[:max_windows]
    if not windows:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one window of {seqlen}")
    out = {}
    digest = windows_digest(ids, windows)
    if capture is not None:
        capture.digest, capture.windows = digest, len(windows)
        capture.problem = check_head(model, ids[None, :64].to(device))
        capture = None if capture.problem else capture
    if reference is not None and reference.digest != digest:
        out["distance_missing"] = "the baseline's reference was made on other windows (tokenizer or text differ)"
        reference = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    losses = window_losses(model, ids, windows, batch_size, device, capture, reference)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    forward_s = time.perf_counter() - t1
    if protocol == "gptq":
        nll = sum(s / n * seqlen for s, n in losses)
        ppl = math.exp(nll / (len(windows) * seqlen))
    else:
        ppl = math.exp(sum(s for s, _ in losses) / sum(n for _, n in losses))
    nll_w, tokens_w = [s for s, _ in losses], [n for _, n in losses]
    ci = perplexity_interval(nll_w, tokens_w)
    out.update({
        "perplexity": ppl,
        "ppl_ci_low": ci[1] if ci else None,
        "ppl_ci_high": ci[2] if ci else None,
        "ppl_window_nll": nll_w,
        "ppl_window_tokens": tokens_w,
        "ppl_windows": len(windows),
        "ppl_tokens_scored": sum(tokens_w),
        "ppl_corpus_tokens": len(ids),
        "ppl_s": time.perf_counter() - t0,                       # tokenization (or its cache) included
        "ppl_tokens_per_s": sum(w.end - w.begin for w in windows) / forward_s,  # model forward only
    })
    if reference is not None:
        out.update(reference.columns(ppl))
        out.update(paired_columns(nll_w, reference.window_nll, tokens_w))
    return out


def paired_columns(nll: list[float], baseline_nll: list[float], tokens: list[int]) -> dict:
    """ln(ppl / baseline ppl) with its paired 95% interval over the same windows."""
    iv = paired_log_ratio(nll, baseline_nll, tokens)
    return {} if iv is None else {"ln_ppl_ratio_ci_low": iv[1], "ln_ppl_ratio_ci_high": iv[2]}


def continuation_perplexity(model, tokenizer, rows: list[str], *, kv, windows: int, prefill: int,
                            continuation: int, device: str) -> dict:
    """Perplexity through a KV cache (protocol `kv-continuation`): the first `windows` non-overlapping windows of
    prefill + continuation tokens of the test split, batched; each window's first `prefill` tokens go through the
    model at once into the cache (a quantized cache quantizes them there), then the continuation is scored token by
    token, each step reading every earlier key and value from the cache. ppl = exp(mean cross-entropy of the
    `continuation` targets). Unlike the weight-only protocols, which score every position of a window in one pass
    with exact attention, every target here is predicted from cached keys and values, as in generation."""
    t0 = time.perf_counter()
    ids = token_ids(tokenizer, corpus_text(rows))
    span = prefill + continuation
    if len(ids) < windows * span:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than {windows} windows of {span}")
    batch = torch.stack([ids[i * span:(i + 1) * span] for i in range(windows)]).to(device)
    nll = torch.zeros((), dtype=torch.float64, device=batch.device)
    with torch.no_grad():
        for t, logits in enumerate(model.logits_through_cache(batch, prefill, kv), start=prefill):
            nll += F.cross_entropy(logits.float(), batch[:, t], reduction="sum").double()
    return {"ppl_kv": math.exp(float(nll) / (windows * continuation)), "ppl_kv_windows": windows,
            "ppl_kv_prefill_tokens": prefill, "ppl_kv_tokens_scored": windows * continuation,
            "ppl_kv_s": time.perf_counter() - t0}
