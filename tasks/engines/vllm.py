"""The vLLM engine: a model served by vLLM's offline `LLM`, its engine core in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0: exceptions surface in the unit, and `apply_model` reaches the module).

One LLM per unit: its settings are the unit's cells' (`serving`): decode eager is `enforce_eager=True`,
compiled is vLLM's default (torch.compile and CUDA graphs); the KV cache's dtype (`auto`, or `fp8`); a KV pool sized
to the largest cell (not a share of the GPU), in blocks of BLOCK tokens; prefix caching off; the prompt batch in one
prefill step (max_num_batched_tokens). Every setting is on the row (`engine_options`).

Verbs (tasks.engines.Model):
- scoring: each window is one request with `prompt_logprobs=0`; a forward hook on the model's logits processor keeps
  the hidden states and head it was given for every position, so the distance gets the reference form the project
  keeps (hidden states + head). Each window's log-probability of the actual token, recomputed from them, must equal
  what vLLM returned (`logprob_check_max_abs`), else the unit fails: the hook relies on vLLM's internals.
- generation: the prompts are added to the engine with DELTA outputs and the engine is stepped by hand; each token's
  mark is when its step returned it on the host (what a streaming client sees), the first one the time to first token.
- memory: the pool is a setting; a cell's KV bytes are its sequences' blocks, and its peak is the allocator's peak less
  the part of the pool the cell did not use.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.units import KvSpec, ModelSpec
from tasks.engines import MemoryRun, Run
from tasks.sources import refuse_saved_quantized, source_folder

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core runs in the unit's process
       "VLLM_USE_FLASHINFER_SAMPLER": "0"}     # else the sampler imports flashinfer, which JIT-compiles offline
KV_DTYPE = {"native": "auto", "fp8": "fp8"}    # the grid's kv_cache -> vLLM's kv_cache_dtype
BLOCK = 16                                     # tokens per KV block
LOGPROB_TOLERANCE = 2e-3                       # |recomputed - vLLM's| log-probability of a window's token
RANDOM_PACKED = "none: random packed weights (synthetic model, vLLM load_format dummy)"


@dataclass(frozen=True)
class Serving:
    """What one LLM must serve: the unit's decode path and KV cache, its longest sequence, its largest batch, and the
    most tokens held at once (sizes the pool)."""
    decode: str = "compiled"
    kv: str = "native"
    max_len: int = 2048
    max_batch: int = 1
    max_tokens: int = 2048
    max_prefill: int = 2048


def serving(cells, perplexity=None, throughput=None) -> Serving:
    """The settings an LLM needs for these cells (one decode path and KV cache: a vLLM unit's), this perplexity
    protocol (one window of seqlen tokens at a time, plus one generated) and the offline throughput's requests
    (requests, prompt_tokens, new_tokens: all held at once, so that they are scheduled together)."""
    lengths = [c.prompt_tokens + c.new_tokens for c in cells]
    held = [c.batch_size * (c.prompt_tokens + c.new_tokens) for c in cells]
    prefill = [c.batch_size * c.prompt_tokens for c in cells]
    batches = [c.batch_size for c in cells] or [1]
    if throughput:
        requests, prompt_tokens, new_tokens = throughput
        lengths.append(prompt_tokens + new_tokens)
        held.append(requests * (prompt_tokens + new_tokens))
        prefill.append(prompt_tokens)  # chunked prefill: one request's prompt at a time is enough to schedule
        batches.append(requests)
    if perplexity:
        lengths.append(perplexity.seqlen + 1)
        held.append(perplexity.seqlen + 1)
        prefill.append(perplexity.seqlen + 1)
    first = cells[0] if cells else None
    return Serving(first.decode if first else "compiled", first.kv.name if first else "native", max(lengths),
                   max(batches), max(held), max(prefill))


def _setenv() -> None:
    for k, v in ENV.items():
        os.environ.setdefault(k, v)


def _element_bytes(dtype: str, kv: str) -> int:
    if kv == "fp8":
        return 1
    return 4 if dtype == "float32" else 2


def load(model: ModelSpec, precision, options, device: str, calibration: dict | None = None,
         unit=None) -> "VLLMModel":
    """An LLM for the unit's cells and perplexity protocol (`serving`) at the precision's vLLM arguments
    (tasks.precisions: `engines["vllm"]`); calibrated precisions load the checkpoint their backend calibrates."""
    _setenv()
    need = serving(unit.cells, unit.perplexity, unit.generation.throughput) if unit is not None else Serving()
    t0 = time.perf_counter()
    import vllm  # noqa: F401 - imported here (its import cost is the unit's), never in the fork server
    from transformers import AutoConfig, AutoTokenizer

    facts = {"import_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    folder, source = source_folder(model, device)
    config = AutoConfig.from_pretrained(folder)
    refuse_saved_quantized(config, folder)
    facts.update(source, prepare_s=time.perf_counter() - t0)
    where, args = folder, precision.engine_args("vllm", options)
    if precision.random_packed("vllm", model.synthetic):  # random weights: calibrating buys nothing
        where, calib = random_packed(folder, precision.engines["vllm"].checkpoint(options))
        args = {**args, "load_format": "dummy"}
        facts.update(calib)
    elif precision.loading.folder is not None:  # a checkpoint saved quantized: vLLM reads its format from its config
        where = precision.loading.folder(options)
    elif precision.loading.prepare is not None:  # gptq, awq: the checkpoint this project calibrates, Marlin in vLLM
        calibration = calibration or {}
        where, calib = precision.loading.prepare(folder, options, device, calibration.get("text"),
                                                 calibration.get("name"), model.synthetic)
        facts.update(calib)
    t0 = time.perf_counter()
    tokenizer = None if model.synthetic else AutoTokenizer.from_pretrained(folder)
    facts["tokenizer_s"] = time.perf_counter() - t0
    tp = int(unit.gpus) if unit is not None and unit.gpus > 1 else 1  # the unit's GPUs, one tensor-parallel rank each
    served = VLLMModel(where, folder, args, config, tokenizer, device, facts, precision, options, need, tp)
    if precision.loading.folder is not None:  # what the saved checkpoint holds, beside vLLM's arguments
        served.facts["quant_config"] += f"; {precision.loading.build(options, device).description}"
    return served


def random_packed(source: str, quantization: dict) -> tuple[str, dict]:
    """A cached folder holding the source's config with `quantization` as its quantization_config, and no weights:
    vLLM builds the quantized layers from it and fills them at random (load_format "dummy"; packed integers are left
    as allocated). The kernels and the bytes they read are a calibrated checkpoint's; the outputs mean nothing."""
    from common.cache import cache_root
    from tasks.sources import publish

    if quantization.get("quant_method") == "gptq":  # vLLM's GPTQ finds its quantized layers from the checkpoint's
        # tensors unless the config names them; a folder without tensors must name them, or every layer loads as fp16
        quantization = {**quantization, "modules_in_block_to_quantize": block_linears(source)}
    config = {**json.loads((Path(source) / "config.json").read_text()), "quantization_config": quantization}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    target = publish(lambda tmp: (tmp / "config.json").write_text(json.dumps(config, indent=2)),
                     cache_root() / f"packed-{key}")
    return str(target), {"calib_text": RANDOM_PACKED, "calib_samples": 0, "calibrated_folder": str(target)}


def block_linears(source: str) -> list[str]:
    """The linear layers of the model's first decoder layer, named within it (self_attn.q_proj, ...): built on the
    meta device, from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    return sorted(n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear))


def check_quantized(precision, options, linear_class: str | None) -> None:
    """A precision of fewer than 16 bits whose linear layers vLLM built unquantized is not that precision: the unit
    fails rather than measure fp16 under its name."""
    if precision.bits(options) < 16 and linear_class == "UnquantizedLinearMethod":
        raise RuntimeError(f"vLLM built every linear layer of {precision.name} unquantized (UnquantizedLinearMethod):"
                           f" its quantization config names no layer vLLM quantizes")


class VLLMModel:
    """A model served by vLLM and the verbs the measurements call (tasks.engines.Model)."""

    def __init__(self, where: str, source: str, args: dict, config, tokenizer, device: str, facts: dict, precision,
                 options, need: Serving, tp: int = 1):
        import torch
        import vllm
        from common.models import kv_geometry, text_config

        self.tokenizer, self.device, self.facts, self.need = tokenizer, device, facts, need
        self.source, self.config = source, config
        self.cuda = device.startswith("cuda")
        text = text_config(config)
        self._vocab = text.vocab_size
        self._max_positions = getattr(text, "max_position_embeddings", None)
        self._geometry = kv_geometry(config)
        dtype = args.get("dtype", "float16")
        self.block_bytes = (2 * self._geometry["layers"] * self._geometry["kv_heads"] * self._geometry["head_dim"]
                            * BLOCK * _element_bytes(dtype, need.kv))
        blocks = math.ceil(need.max_tokens / BLOCK) + need.max_batch + 1  # every sequence's last block partly full
        self.options = {**args, "enforce_eager": need.decode == "eager", "kv_cache_dtype": KV_DTYPE[need.kv],
                        "max_model_len": need.max_len, "max_num_seqs": need.max_batch,
                        "max_num_batched_tokens": max(need.max_prefill, need.max_len),
                        "kv_cache_memory_bytes": math.ceil(blocks * self.block_bytes / tp), "block_size": BLOCK,
                        "enable_prefix_caching": False, "skip_tokenizer_init": True, "seed": 0}
        if tp > 1:  # each rank holds 1/tp of every block (its share of the KV heads): the pool is per GPU
            self.options["tensor_parallel_size"] = tp
        t0 = time.perf_counter()
        self.llm = vllm.LLM(model=where, **self.options)
        if self.cuda:
            torch.cuda.synchronize()
        vconfig = self.llm.llm_engine.vllm_config
        self.pool_bytes = int(vconfig.cache_config.num_gpu_blocks or blocks) * self.block_bytes
        if self.cuda:  # the pool is allocated with the model: what the weights hold is the rest
            facts["weights_allocated_bytes"] = torch.cuda.memory_allocated() - self.pool_bytes
        self.options["async_scheduling"] = getattr(vconfig.scheduler_config, "async_scheduling", None)
        self._ids = itertools.count()
        self._captured: list = []
        self._head = None
        self._capturing = False
        self.llm.apply_model(self._install_hook)
        linear_class = self._first(_linear_methods)
        check_quantized(precision, options, linear_class)
        facts.update(load_s=time.perf_counter() - t0, engine_version=vllm.__version__,
                     engine_options=json.dumps(self.options, sort_keys=True, default=str),
                     attention_backend=self._first(_attention_backend), linear_class=linear_class,
                     quant_config=f"vLLM {json.dumps(args, sort_keys=True)}", quant_library=precision.method.library,
                     quant_scheme=precision.method.scheme, weight_bits_nominal=float(precision.bits(options)),
                     quant_library_version=_version(precision.method.distribution or precision.method.library))

    def _first(self, fn):
        return (self.llm.apply_model(fn) or [None])[0]

    # ------------------------------------------------------------------------------------------- what it is

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def geometry(self) -> dict[str, int]:
        return self._geometry

    @property
    def max_positions(self) -> int | None:
        return self._max_positions

    def weight_stats(self) -> dict:
        stats = self._first(_module_bytes)
        params = _logical_params(self.source) or stats["params"]
        return {"params": params, "weights_bytes": stats["weights_bytes"],
                "bits_per_param": 8.0 * stats["weights_bytes"] / params if params else None,
                "embedding_unread_bytes": stats["embedding_unread_bytes"]}

    # ----------------------------------------------------------------------------------------------- scoring

    def _install_hook(self, module):
        processor = getattr(module, "logits_processor", None)
        if processor is None:
            raise RuntimeError("the vLLM model has no logits_processor: its hidden states cannot be read")

        def hook(mod, args, output):
            if self._capturing:
                lm_head, hidden = args[0], args[1]
                self._captured.append(hidden.detach().clone())
                if self._head is None:
                    self._head = (lm_head, mod)
        processor.register_forward_hook(hook)
        return True

    def hidden_states(self, ids):
        """[batch, tokens, hidden]: each window as one request; the positions' hidden states as the logits processor
        received them (prompt positions for prompt_logprobs, the last for sampling), checked against vLLM's own
        log-probabilities."""
        import torch
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        out, worst = [], 0.0
        for row in ids.tolist():
            self._captured.clear()
            self._capturing = True
            try:
                result = self.llm.generate([TokensPrompt(prompt_token_ids=row)], params, use_tqdm=False)[0]
            finally:
                self._capturing = False
            hidden = _order(self._captured, len(row))
            worst = max(worst, self._check(hidden, row, result.prompt_logprobs))
            out.append(hidden)
        self.facts["logprob_check_max_abs"] = max(worst, self.facts.get("logprob_check_max_abs") or 0.0)
        return torch.stack(out).to(self.device)

    def _check(self, hidden, row: list[int], returned) -> float:
        """The largest difference between the log-probability of each next token recomputed from the captured hidden
        states and head, and vLLM's prompt_logprobs; a mismatch means the capture is not what vLLM scored."""
        import torch

        weight, bias = self.output_head()
        with torch.no_grad():
            lp = torch.log_softmax(torch.nn.functional.linear(hidden[:-1], weight, bias).float(), dim=-1)
            mine = lp.gather(-1, torch.tensor(row[1:], device=lp.device)[:, None]).squeeze(-1).cpu().tolist()
        theirs = [d[t].logprob for d, t in zip(returned[1:], row[1:])]
        worst = max(abs(a - b) for a, b in zip(mine, theirs))
        if worst > LOGPROB_TOLERANCE:
            raise RuntimeError(f"the hidden states read from vLLM's logits processor do not give vLLM's own "
                               f"log-probabilities (largest difference {worst:.2e}): the hook no longer matches this "
                               f"vLLM")
        return worst

    def output_head(self):
        """(weight [vocab, hidden], None) of the head the logits processor applies, its padding cut off; refused where
        the processor scales or soft-caps the logits (the hidden states would not give them)."""
        if self._head is None:
            raise RuntimeError("no window has been scored yet: the head is read from the logits processor's inputs")
        lm_head, processor = self._head
        if getattr(processor, "soft_cap", None) is not None or getattr(processor, "scale", 1.0) != 1.0:
            raise RuntimeError("vLLM's logits processor scales or soft-caps the logits")
        weight = lm_head.weight[: processor.org_vocab_size]
        bias = getattr(lm_head, "bias", None)
        return weight, bias[: processor.org_vocab_size] if bias is not None else None

    def logits(self, ids):
        import torch

        hidden = self.hidden_states(ids)
        return torch.nn.functional.linear(hidden, *self.output_head())

    def logits_through_cache(self, ids, prefill: int, kv: KvSpec | None):
        raise NotImplementedError("vLLM schedules its own KV cache: the kv-continuation protocol scores through a "
                                  "cache step by step, which the hf engine does")

    # -------------------------------------------------------------------------------------------- generation

    def generation(self, ids, new_tokens: int, decode: str, kv: KvSpec | None) -> "VLLMGeneration":
        want = (decode, kv.name if kv else "native")
        if want != (self.need.decode, self.need.kv):
            raise RuntimeError(f"this LLM serves decode {self.need.decode} with KV cache {self.need.kv}, not {want}")
        return VLLMGeneration(self, ids.tolist(), new_tokens)


def _order(captured: list, tokens: int):
    """The window's hidden states in position order: the prompt positions' (tokens - 1 rows, in one or more calls)
    then the last position's (the sampling call, one row); where the prompt calls already cover every position
    (tokens rows), those. _check holds the order to vLLM's own log-probabilities."""
    import torch

    prompt = [h for h in captured if h.shape[0] != 1]
    last = [h for h in captured if h.shape[0] == 1]
    rows = sum(h.shape[0] for h in prompt)
    if rows not in (tokens - 1, tokens) or len(last) != 1:
        raise RuntimeError(f"vLLM's logits processor saw {rows} prompt rows and {len(last)} sampling calls for a "
                           f"window of {tokens} tokens (expected {tokens - 1} or {tokens}, and 1)")
    return torch.cat(prompt if rows == tokens else prompt + last)


@dataclass
class VLLMGeneration:
    """One cell's generation through vLLM (tasks.engines.Generation): the batch's prompts added to the engine, then
    the engine stepped until every sequence has exactly `new_tokens` tokens."""
    model: VLLMModel
    prompts: list[list[int]]
    new_tokens: int
    compile_s: float | None = None     # vLLM compiles when the LLM is made (load_s)
    timing_source: str = "vLLM engine steps: the host time each token arrived (DELTA outputs)"
    marks: list = field(default_factory=list)

    def _params(self, n: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False,
                              output_kind=RequestOutputKind.DELTA)

    def _go(self, n: int) -> list[float]:
        """Generate n tokens for every prompt; the host times at which every sequence had 1, 2, ... n tokens, from
        the moment the requests were added (after the GPU was idle)."""
        import torch
        from vllm.inputs import TokensPrompt

        engine = self.model.llm.llm_engine
        params = self._params(n)
        if self.model.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = {}
        for p in self.prompts:
            rid = f"r{next(self.model._ids)}:"  # a terminator: vLLM may append to it, and r1: is no prefix of r10:
            done[rid] = 0
            engine.add_request(rid, TokensPrompt(prompt_token_ids=p), params)
        marks = []
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            for o in outputs:
                rid = o.request_id if o.request_id in done else next(k for k in done if o.request_id.startswith(k))
                done[rid] += len(o.outputs[0].token_ids)
            have = min(done.values())
            marks += [now] * (have - len(marks))
        if any(v != n for v in done.values()):
            raise RuntimeError(f"vLLM generated {sorted(set(done.values()))} tokens where exactly {n} were asked for")
        return [t - t0 for t in marks]

    def run(self) -> Run:
        t = self._go(self.new_tokens)
        ms = [x * 1e3 for x in t]
        return Run([ms[0]] + [b - a for a, b in zip(ms, ms[1:])])

    def run_untimed(self) -> None:
        self._go(self.new_tokens)

    def prefill_only(self) -> None:
        self._go(1)

    def memory_run(self) -> MemoryRun:
        """One generation with the allocator's peak reset: the pool is allocated whole up front, so the cell's
        memory counts only the blocks its sequences hold."""
        import torch

        m = self.model
        cell_kv = sum(math.ceil((len(p) + self.new_tokens) / BLOCK) for p in self.prompts) * m.block_bytes
        unused = m.pool_bytes - cell_kv
        if m.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        self._go(self.new_tokens)
        if m.cuda:
            torch.cuda.synchronize()
            peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        else:
            peak = after = before = 0
        facts = {"kv_pool_bytes": m.pool_bytes, "kv_block_tokens": BLOCK, "kv_block_bytes": m.block_bytes}
        return MemoryRun(before - m.pool_bytes, peak - unused, peak - unused, after - unused, after - unused, cell_kv,
                         _element_bytes(m.options.get("dtype", "float16"), m.need.kv), facts)

    def profile(self, top: int = 10) -> list[dict] | None:
        return None  # vLLM's own profiler writes traces to a folder; no per-step table here

    def counters(self) -> dict:
        return {}

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------- read off the module

def _attention_backend(module) -> str | None:
    for m in module.modules():
        backend = getattr(m, "attn_backend", None)
        if backend is not None:
            return backend.get_name() if hasattr(backend, "get_name") else type(backend).__name__
    return None


def _linear_methods(module) -> str:
    """The quantization methods of the first decoder layer's linear layers (which kernel path vLLM took)."""
    layer = next((m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")), module)
    names = {type(m.quant_method).__name__ for m in layer.modules() if getattr(m, "quant_method", None) is not None}
    return ",".join(sorted(names))


def _module_bytes(module) -> dict:
    """Bytes of every parameter and buffer as stored (each storage once), the parameters' element count, and the
    input embedding's bytes where the output head does not share it (a decode step does not read it)."""
    seen: dict[int, int] = {}
    count = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.numel():
            seen.setdefault(t.data_ptr(), t.numel() * t.element_size())
    for p in module.parameters():
        count += p.numel()
    embed = next((m for n, m in module.named_modules() if n.endswith("embed_tokens")), None)
    head = getattr(module, "lm_head", None)
    tied = embed is not None and head is not None and embed.weight.data_ptr() == head.weight.data_ptr()
    unread = 0 if tied or embed is None else embed.weight.numel() * embed.weight.element_size()
    return {"weights_bytes": sum(seen.values()), "params": count, "embedding_unread_bytes": unread}


def _logical_params(folder: str) -> int | None:
    """Parameters of the unquantized source checkpoint, from its safetensors headers (a packed 4-bit weight in
    vLLM's module would count as a quarter)."""
    from pathlib import Path

    try:
        from safetensors import safe_open
    except ImportError:
        return None
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                total += math.prod(shape)
    return total or None


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
