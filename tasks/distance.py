"""Distance to the baseline: how far a precision's next-token distributions are from the baseline precision's, on
exactly the windows perplexity scores, over the whole vocabulary (llama.cpp's `--kl-divergence` statistics, for every
precision the registry has).

The reference, made by the baseline unit during its perplexity pass: the final hidden states it fed its output head at
every position of those windows, in its own dtype, and that head (weight, bias), plus its per-window losses. A unit
of another precision recomputes the baseline's full-vocabulary logits from them (the same matmul the baseline ran, in
the same dtype) while it scores the same windows, so nothing is approximated: no top-k truncation, no 16-bit rounding
of log-probabilities. Size, the whole WikiText-2 test split: SmolLM2-135M (hidden 576, vocabulary 49,152, 148
windows of 2048) 349 MB of fp16 hidden states + a 57 MB head; an 8B model with a 128k vocabulary (hidden 4096,
~141 windows) 2.4 GB + 1.05 GB. Full-vocabulary log-probs in 16 bits would take 29.8 GB and ~74 GB.

Per scored position: KL(P_baseline || P_precision) = Σ_v p(v) (ln p(v) − ln q(v)), whether both argmaxes agree, and
Δp = q(target) − p(target) of the correct token.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from common.cache import reference_path
from common.stats import percentile

SELF = "self (the baseline)"


def windows_digest(ids, windows) -> str:
    """What the scored windows are: the token ids and the window boundaries (a reference fits only these)."""
    h = hashlib.sha256(ids.numpy().tobytes())
    h.update(repr([(w.begin, w.end, w.score_from) for w in windows]).encode())
    return h.hexdigest()[:16]


@dataclass
class Capture:
    """Collects the baseline's hidden states window by window, then writes the reference."""
    digest: str = ""
    windows: int = 0
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    problem: str | None = None        # why no reference can be made (check_head)

    def add(self, index: int, hidden: torch.Tensor) -> None:
        self.hidden[index] = hidden.detach().to("cpu", copy=True)

    def save(self, key: str, model, window_nll: list[float], window_tokens: list[int], ppl: float) -> str:
        weight, bias = model.output_head()
        path = reference_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"digest": self.digest, "hidden": [self.hidden[i] for i in range(self.windows)],
                    "weight": weight.detach().cpu(), "bias": None if bias is None else bias.detach().cpu(),
                    "window_nll": window_nll, "window_tokens": window_tokens, "perplexity": ppl}, tmp)
        os.replace(tmp, path)
        return str(path)


def check_head(model, ids) -> str | None:
    """Why the reference cannot be made from hidden states (None if it can): the model's logits must be its output
    head applied to what hidden_states returns (not so with logit soft-capping or scaling)."""
    with torch.no_grad():
        logits = model.logits(ids[:1, :64]).float()
        weight, bias = model.output_head()
        again = F.linear(model.hidden_states(ids[:1, :64]), weight, bias).float()
    if not torch.allclose(logits, again, rtol=1e-3, atol=1e-3 * logits.abs().max().item()):
        return "the model's logits are not its output head applied to its last hidden state (soft-capping?)"
    return None


class Reference:
    """A loaded reference, and the running distance statistics of one precision against it."""

    def __init__(self, path: str, device: str):
        data = torch.load(path, map_location="cpu", weights_only=True)
        self.digest = data["digest"]
        self.hidden = data["hidden"]
        self.weight = data["weight"].to(device)
        self.bias = None if data["bias"] is None else data["bias"].to(device)
        self.window_nll, self.window_tokens = data["window_nll"], data["window_tokens"]
        self.perplexity = data["perplexity"]
        self.device = device
        self.kl: list[torch.Tensor] = []
        self.agree = 0
        self.dp_sum = self.dp_sq = 0.0
        self.positions = 0

    def add(self, index: int, lo: int, hi: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Positions lo-1..hi-2 of window `index` (predicting tokens lo..hi-1); `logits`: the precision's, fp32."""
        h = self.hidden[index][lo - 1:hi - 1].to(self.device)
        lp = F.log_softmax(F.linear(h, self.weight, self.bias).double(), dim=-1)  # the baseline's logits, as it ran
        lq = F.log_softmax(logits.double(), dim=-1)                              # them; sums over the vocabulary
        self.kl.append((lp.exp() * (lp - lq)).sum(-1).cpu())                     # in float64
        self.agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        t = targets.unsqueeze(-1)
        dp = (lq.gather(-1, t).exp() - lp.gather(-1, t).exp()).squeeze(-1)
        self.dp_sum += float(dp.sum())
        self.dp_sq += float((dp * dp).sum())
        self.positions += int(t.shape[0])

    def columns(self, ppl: float) -> dict:
        kl = sorted(torch.cat(self.kl).clamp_min(0).tolist())  # (rounding can leave -1e-9 where both agree)
        n = self.positions
        return {"kl_mean": sum(kl) / n, "kl_median": percentile(kl, 0.5), "kl_p90": percentile(kl, 0.9),
                "kl_p99": percentile(kl, 0.99), "kl_max": kl[-1], "top1_agreement": self.agree / n,
                "delta_p_mean": self.dp_sum / n, "delta_p_rms": math.sqrt(self.dp_sq / n),
                "ln_ppl_ratio": math.log(ppl / self.perplexity), "distance_positions": n}


def self_columns(positions: int) -> dict:
    """The baseline against itself: by definition."""
    return {"kl_mean": 0.0, "kl_median": 0.0, "kl_p90": 0.0, "kl_p99": 0.0, "kl_max": 0.0, "top1_agreement": 1.0,
            "delta_p_mean": 0.0, "delta_p_rms": 0.0, "ln_ppl_ratio": 0.0, "distance_positions": positions,
            "distance_reference": SELF}
