"""A stand-in for vLLM's offline API on CPU (no vLLM wheel runs there), for the tests of tasks/engines/vllm.py: the
calls that module makes, served by a transformers model. Its logits go through a `logits_processor` submodule the
way vLLM's do (prompt positions in chunks of 1024 for prompt_logprobs, the sampled position first), and its engine
steps one token for every running request per step, as vLLM's scheduler does for a batch that fits."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from vllm.inputs import TokensPrompt  # noqa: F401 - as vLLM exports it
from vllm.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.0.0+fake"
CHUNK = 1024
PROMPT_COVERS_LAST = False  # True: the prompt chunks cover every position, the last too (vLLM 0.26 on an H100 did)
MADE: list = []  # every LLM made, with its settings (the tests read them)


class LogitsProcessor(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.org_vocab_size, self.scale, self.soft_cap = vocab, 1.0, None

    def forward(self, lm_head, hidden_states, embedding_bias=None):
        return F.linear(hidden_states, lm_head.weight)[..., :self.org_vocab_size]


class Served(torch.nn.Module):
    """The module `apply_model` hands over: vLLM's names (model, lm_head, logits_processor)."""

    def __init__(self, hf):
        super().__init__()
        self.model, self.lm_head = hf.base_model, hf.get_output_embeddings()
        self.logits_processor = LogitsProcessor(hf.config.vocab_size)

    def hidden(self, ids: list[int]):
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]

    def compute_logits(self, hidden):
        return self.logits_processor(self.lm_head, hidden)


@dataclass
class Logprob:
    logprob: float


@dataclass
class Request:
    ids: list[int]
    params: SamplingParams
    made: list[int] = field(default_factory=list)


class Engine:
    def __init__(self, served: Served, blocks: int):
        self.served, self.requests = served, {}
        self.vllm_config = SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=blocks, block_size=16),
                                           scheduler_config=SimpleNamespace(async_scheduling=True))

    def add_request(self, request_id, prompt, params):
        self.requests[request_id] = Request(list(prompt["prompt_token_ids"]), params)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self):
        out = []
        for rid, r in list(self.requests.items()):
            h = self.served.hidden(r.ids + r.made)[-1:]
            token = int(self.served.compute_logits(h).argmax(-1))
            r.made.append(token)
            finished = len(r.made) >= r.params.max_tokens
            delta = r.params.output_kind is RequestOutputKind.DELTA  # else every token so far, as vLLM does
            out.append(SimpleNamespace(request_id=rid, finished=finished,
                                       outputs=[SimpleNamespace(token_ids=[token] if delta else list(r.made))]))
            if finished:
                del self.requests[rid]
        return out


def linear_method(quantization: str | None, name: str, gptq_layers: list[str] | None):
    """The quant method vLLM would give a decoder layer's linear layer: the stand-in computes in fp32 whatever the
    format, but names the method as vLLM does. GPTQ quantizes the layers its config names, else those the
    checkpoint's tensors hold quantized (none in a folder without tensors)."""
    if quantization == "gptq" and not any(layer in name for layer in gptq_layers or []):
        quantization = None
    kind = {None: "Unquantized", "gptq": "AutoGPTQ", "awq": "AutoAWQMarlin", "fp8": "Fp8PerTensorOnline",
            "bitsandbytes": "BitsAndBytes"}[quantization]
    return type(f"{kind}LinearMethod", (), {})()


class LLM:
    def __init__(self, model: str, dtype: str = "float16", kv_cache_memory_bytes: int = 0, block_size: int = 16,
                 **settings):
        from transformers import AutoConfig, AutoModelForCausalLM

        MADE.append({"model": model, "dtype": dtype, "kv_cache_memory_bytes": kv_cache_memory_bytes, **settings})
        if settings.get("load_format") == "dummy":  # random weights from the config alone, as vLLM's dummy loader
            config = AutoConfig.from_pretrained(model)
            config.__dict__.pop("quantization_config", None)  # the stand-in serves every format unquantized
            torch.manual_seed(1234)
            hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        else:
            hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        checkpoint = getattr(AutoConfig.from_pretrained(model), "quantization_config", None) or {}
        quantization = settings.get("quantization") or checkpoint.get("quant_method")
        layers = checkpoint.get("modules_in_block_to_quantize")
        for name, m in hf.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.quant_method = linear_method(quantization, name, layers)
        self.served = Served(hf)
        ranks = settings.get("tensor_parallel_size", 1)  # the pool is per GPU; each rank holds 1/ranks of a block
        self.llm_engine = Engine(self.served, max(1, kv_cache_memory_bytes * ranks // 4096))
        self._ids = itertools.count()

    def apply_model(self, fn):
        return [fn(self.served)]

    def generate(self, prompts, params, use_tqdm=True):
        outs = []
        for p in prompts:
            ids = list(p["prompt_token_ids"])
            hidden = self.served.hidden(ids)
            last = self.served.compute_logits(hidden[-1:])  # the sampled position first, as vLLM does
            lp = []
            end = len(ids) if PROMPT_COVERS_LAST else len(ids) - 1
            for lo in range(0, end, CHUNK):  # then prompt_logprobs, chunk by chunk
                logits = self.served.compute_logits(hidden[lo:min(lo + CHUNK, end)])
                lp.append(torch.log_softmax(logits.float(), -1))
            lp = torch.cat(lp)[:len(ids) - 1]
            prompt_logprobs = [None] + [{t: Logprob(float(lp[i, t]))} for i, t in enumerate(ids[1:])]
            outs.append(SimpleNamespace(prompt_logprobs=prompt_logprobs,
                                        outputs=[SimpleNamespace(token_ids=[int(last.argmax(-1))])]))
        return outs
