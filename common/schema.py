"""The results schema: one Parquet row per cell, written by the driver (rows of cells that did not run) and the
worker, read by the report. `python -m orchestrator schema` prints it as Markdown (docs/schema.md, linked from the
README; a test keeps the two equal)."""
from __future__ import annotations

import pyarrow as pa

S, I, F, B = pa.string(), pa.int64(), pa.float64(), pa.bool_()
T = pa.timestamp("us", tz="UTC")
LF = pa.list_(pa.float64())
LI = pa.list_(pa.int64())
KERNELS = pa.list_(pa.struct([("name", pa.string()), ("calls", pa.int64()), ("time_us", pa.float64())]))

# (column, type, meaning). Units are in the names: _ms, _s, _bytes, _gbs (GB/s = 1e9 bytes/s).
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    # identity and axes
    ("cell_key", S, "stable hash of the cell's full configuration (model, precision and options, settings)"),
    ("sweep", S, "sweep name"),
    ("run_id", S, "the sweep run that produced the row"),
    ("unit_id", S, "hash of (model, precision): the Ray task that measured the cell"),
    ("attempt", I, "1 for the first try of the unit, 2.. for retries after a worker crash"),
    ("engine", S, "what ran the model: hf (transformers: eager, or its decode step compiled) | vllm (vLLM's offline "
                  "LLM, its engine core in the unit's process)"),
    ("engine_version", S, "the engine's version where it is not transformers (vLLM's)"),
    ("engine_options", S, "every setting the engine was made with, as JSON (vLLM: enforce_eager, kv_cache_dtype, "
                          "max_model_len, max_num_seqs, max_num_batched_tokens, kv_cache_memory_bytes, block_size, "
                          "enable_prefix_caching, async_scheduling, dtype, quantization)"),
    ("attention_backend", S, "the attention backend the engine chose (vLLM: FLASH_ATTN, ...)"),
    ("logprob_check_max_abs", F, "vLLM: the largest difference between each window's next-token log-probability "
                                 "recomputed from the hidden states and head read off its logits processor, and "
                                 "vLLM's own prompt_logprobs (the reference form for distances; the unit fails "
                                 "beyond 2e-3)"),
    ("model", S, "model label"),
    ("model_spec", S, "the model entry as JSON (source, revision, path, ...)"),
    ("model_source", S, "hub | path | gguf | synthetic"),
    ("model_revision", S, "hub revision, if set"),
    ("model_file_sha256", S, "sha256 of a GGUF source file"),
    ("weights_note", S, "caveat on the weights: synthetic, or already quantized in a GGUF file"),
    ("precision", S, "precision label: name plus options that differ from the defaults"),
    ("baseline", S, "the precision label the sweep compares against"),
    ("precision_name", S, "registry name (fp16, nf4, torchao-int4wo, hqq, ...: see the README)"),
    ("precision_description", S, "what the precision quantizes and how, in words (the registry's description)"),
    ("precision_options", S, "every option of the precision as JSON, defaults included"),
    ("new_tokens", I, "tokens generated per sequence"),
    ("batch_size", I, "sequences per batch"),
    ("decode", S, "eager (DynamicCache, eager kernels) or compiled (StaticCache + torch.compile of the decode step)"),
    ("kv_cache", S, "KV cache label: native (DynamicCache in the model's dtype) or a quantized cache (quanto-int4, "
                    "hqq-int2, ...) plus options that differ from the defaults"),
    ("kv_cache_options", S, "the quantized cache's options as JSON (q_group_size, residual_length)"),
    ("prompt_tokens", I, "prompt length in tokens (an axis: generation.prompt_tokens)"),
    ("warmup", I, "untimed runs before the timed ones"),
    ("repeats", I, "timed runs asked for (0 = auto: see repeats_done)"),
    ("gpus_per_task", F, "GPUs the unit asked Ray for (0 = CPU)"),
    ("measurement_version", I, "version of the measurement code, by decode (common.catalog); part of the cell key"),
    # outcome
    ("status", S, "ok | error | oom | timeout | skipped"),
    ("error_type", S, "exception class, Unsupported, WorkerCrashedError, Timeout ..."),
    ("error_message", S, "the error or the reason for skipping"),
    ("traceback", S, "Python traceback of an error"),
    ("started_at", T, "cell start (UTC)"),
    ("ended_at", T, "cell end (UTC)"),
    ("prepare_s", F, "seconds to materialise the source (GGUF conversion, synthetic weights; 0 when cached)"),
    ("load_s", F, "seconds to load the model at its precision (quantization included; vLLM: making the LLM, its "
                  "compilation and CUDA graph capture included)"),
    ("import_s", F, "seconds to import the loading code (transformers' modeling_utils, and with it torchao/hqq where "
                    "installed and the unit uses them: never preloaded, since they touch the GPU), the unit's first "
                    "model load only"),
    ("tokenizer_s", F, "seconds to load the tokenizer"),
    ("load_wall_s", F, "seconds of the whole load step of the unit (imports, source, calibration, loading, "
                       "quantizing, tokenizer, counting the weights)"),
    ("quality_wall_s", F, "seconds of the whole quality step (perplexity, the reference's load or save, distances)"),
    ("unit_started_at", T, "when the unit's process entered the unit (UTC): against sweep.json's per_unit_parts, "
                           "what the time before it went to"),
    ("unit_setup_s", F, "seconds from the unit's process entering the unit to the start of loading (on a GPU: its "
                        "CUDA context, the environment's fingerprint)"),
    ("reference_save_s", F, "baseline unit: seconds to write the reference for distances to the node's cache"),
    ("reference_load_s", F, "seconds to read the baseline's reference from the node's cache"),
    ("latency_s", F, "seconds spent measuring this cell (warm-up, repeats, memory run)"),
    # weights
    ("params", I, "parameters (4-bit packed tensors counted unpacked)"),
    ("weights_bytes", I, "bytes of every parameter and buffer as stored, quantization state included"),
    ("bits_per_param", F, "8 x weights_bytes / params"),
    ("embedding_unread_bytes", I, "input-embedding bytes a decode step does not read (0 when tied to the LM head)"),
    ("weights_allocated_bytes", I, "GPU memory allocated after load"),
    ("rss_after_load_bytes", I, "process resident memory after load"),
    ("model_loads_in_worker", I, "models loaded by the process that measured the unit (always 1)"),
    ("quant_library", S, "who quantized the weights: torch (none), bitsandbytes, torchao, quanto, hqq, gptqmodel"),
    ("quant_library_version", S, "version of that library"),
    ("linear_class", S, "module classes that run the first decoder layer's projections (the kernel path taken)"),
    ("quant_scheme", S, "none | weight-only | weight+activation | as saved (precision saved: its checkpoint's)"),
    ("weight_bits_nominal", F, "bits of a quantized weight as the method names it (4 for nf4; bits_per_param is measured)"),
    ("quant_config", S, "what was applied, as the library's call (e.g. torchao's int4 packing for this device)"),
    ("quantize_s", F, "time of the backend's own step after loading (hqq quantizes the loaded model; torchao with "
                      "unwrap: true unwraps its weights), apart from load_s"),
    ("calibration_s", F, "gptq/awq: seconds the calibration took when the calibrated checkpoint was built (also on "
                         "rows that loaded it from the cache)"),
    ("calibration_cached", B, "gptq/awq: the calibrated checkpoint came from the disk cache (no calibration now)"),
    ("calibration_device", S, "device the calibration ran on"),
    ("calib_text", S, "calibration data: a file path, the hub's validation split, random token ids (synthetic), or "
                      "none (a synthetic model through vLLM: random packed weights in the checkpoint's format)"),
    ("calib_sha256", S, "sha256 of the calibration text"),
    ("calib_samples", I, "calibration samples"),
    ("calib_seqlen", I, "tokens per calibration sample"),
    ("calibrated_folder", S, "the cached calibrated checkpoint"),
    # perplexity
    ("perplexity", F, "WikiText-2 raw test perplexity under ppl_protocol"),
    ("ppl_protocol", S, "gptq | strided (see tasks/perplexity.py)"),
    ("ppl_seqlen", I, "window length in tokens"),
    ("ppl_stride", I, "window step (strided only)"),
    ("ppl_max_windows", I, "window cap (null = the whole split)"),
    ("ppl_batch_size", I, "windows per forward pass"),
    ("ppl_windows", I, "windows scored"),
    ("ppl_tokens_scored", I, "target tokens scored"),
    ("ppl_corpus_tokens", I, "tokens in the tokenized split"),
    ("ppl_dataset", S, "where the text came from (file path or hub dataset)"),
    ("ppl_dataset_sha256", S, "sha256 of the local file"),
    ("ppl_s", F, "seconds for perplexity, tokenization included"),
    ("ppl_tokens_per_s", F, "window tokens through the model per second (forward only)"),
    ("ppl_ci_low", F, "perplexity, 95% interval, low end: a t-interval on the mean loss per token over windows "
                      "(windows as independent samples; ratio estimator for windows of unequal length), through exp"),
    ("ppl_ci_high", F, "perplexity, 95% interval, high end"),
    ("ppl_window_nll", LF, "raw: each window's summed cross-entropy (nats), in window order: anyone can recompute "
                           "the perplexity, its interval, and paired differences between precisions"),
    ("ppl_window_tokens", LI, "raw: each window's scored tokens"),
    ("ppl_batch_invariant", B, "false where the precision's numbers depend on which windows share a forward pass "
                               "(LLM.int8 with outliers picks its outlier columns per batch): measured one window at a "
                               "time unless perplexity.batch_size says otherwise"),
    ("quality_key", S, "hash of what perplexity and distance depend on (model, precision, perplexity settings, "
                       "dataset, baseline): measured once per key, reused by later sweeps"),
    ("quality_reused", B, "perplexity and distance copied from an earlier row with the same quality_key"),
    ("kl_mean", F, "distance to the baseline: mean over scored positions of KL(P_baseline || P_precision) of the "
                   "next-token distributions over the whole vocabulary (nats); 0 on the baseline's own rows"),
    ("kl_median", F, "median of the per-position KL"),
    ("kl_p90", F, "90th percentile of the per-position KL"),
    ("kl_p99", F, "99th percentile of the per-position KL"),
    ("kl_max", F, "largest per-position KL"),
    ("top1_agreement", F, "share of scored positions where the baseline's and this precision's most likely next "
                          "tokens agree (1 on the baseline's own rows)"),
    ("delta_p_mean", F, "mean of q(correct token) - p(correct token): this precision's probability of the true next "
                        "token minus the baseline's"),
    ("delta_p_rms", F, "root mean square of that difference"),
    ("ln_ppl_ratio", F, "ln(perplexity / the baseline's perplexity) on the same windows"),
    ("ln_ppl_ratio_ci_low", F, "its paired 95% interval over the same windows, low end (contains 0: "
                               "indistinguishable from the baseline)"),
    ("ln_ppl_ratio_ci_high", F, "its paired 95% interval, high end"),
    ("distance_positions", I, "positions the distance was measured on (the perplexity's scored targets)"),
    ("distance_reference", S, "the baseline precision the distance is against, 'self (the baseline)' on its rows"),
    ("distance_missing", S, "why there is no distance (synthetic weights, the baseline unit failed, ...)"),
    ("ppl_skipped_reason", S, "why there is no perplexity (synthetic weights, off in the grid)"),
    ("ppl_error", S, "perplexity failure, if any"),
    ("ppl_status", S, "status of the perplexity measurement when it failed"),
    ("ppl_kv", F, "perplexity through this cell's KV cache, protocol kv-continuation: the prefill goes into the cache, "
                  "the continuation is scored token by token from cached keys/values (not comparable with perplexity)"),
    ("ppl_kv_windows", I, "kv-continuation: windows (batched)"),
    ("ppl_kv_prefill_tokens", I, "kv-continuation: tokens per window put into the cache at once"),
    ("ppl_kv_tokens_scored", I, "kv-continuation: targets scored, one decode step each"),
    ("ppl_kv_s", F, "kv-continuation: seconds"),
    ("ppl_kv_skipped_reason", S, "why there is no ppl_kv (synthetic weights)"),
    ("ppl_kv_error", S, "kv-continuation failure, if any"),
    # latency
    ("ttft_ms", F, "time to first token (prefill), median of repeats"),
    ("ttft_ms_mean", F, "time to first token, mean of repeats"),
    ("prefill_tokens_per_s", F, "batch_size x prompt_tokens x 1000 / ttft_ms: the prompt's tokens through the model "
                                "per second"),
    ("decode_ms_per_token", F, "mean gap between consecutive tokens over all repeats"),
    ("timing_source", S, "how the engine timed each run: CUDA events after every step, the host clock after every "
                         "step (CPU), the engine's per-request timestamps, or wall-clock (t(N) - t(1)) / (N - 1)"),
    ("decode_ms_p50", F, "median decode gap"),
    ("decode_ms_p90", F, "90th percentile decode gap"),
    ("decode_ms_p99", F, "99th percentile decode gap"),
    ("decode_tokens_per_s", F, "batch_size x 1000 / decode_ms_per_token"),
    ("decode_host_ms_per_token", F, "mean host time (perf_counter) between consecutive decode marks: how long the "
                                    "host took to issue a step. Compiled on a GPU (one launch a step), near "
                                    "decode_ms_per_token: the GPU waited for the host (host-bound; the figure is this "
                                    "host's CPU); well below: the host ran ahead and the figure is the GPU's. Eager "
                                    "steps fill CUDA's launch queue, and then the host waits either way. Above it "
                                    "(rows before measurement version 3, compiled 4, whose decode did not start from "
                                    "an idle GPU): the GPU ran steps queued during the prefill"),
    ("e2e_s", F, "prefill + decode seconds, mean of repeats"),
    ("e2e_tokens_per_s", F, "batch_size x new_tokens / e2e_s"),
    ("throughput_tokens_per_s", F, "offline throughput, measured once per unit: generation.throughput's requests "
                                   "(throughput_requests prompts of throughput_prompt_tokens) handed to the engine "
                                   "together, each generating exactly throughput_new_tokens; generated tokens per "
                                   "wall-clock second, prefill included, mean over timed runs after one warm-up. "
                                   "The same on every row of the unit"),
    ("throughput_ci_low", F, "offline throughput, 95% interval on the mean over its timed runs, low end"),
    ("throughput_ci_high", F, "offline throughput, 95% interval, high end"),
    ("throughput_s_samples", LF, "raw: wall seconds of each timed throughput run"),
    ("throughput_requests", I, "offline throughput: requests handed over together"),
    ("throughput_prompt_tokens", I, "offline throughput: prompt tokens per request"),
    ("throughput_new_tokens", I, "offline throughput: tokens generated per request"),
    ("throughput_decode", S, "offline throughput: the decode path it ran (eager, or compiled: CUDA graphs in vLLM)"),
    ("throughput_missing", S, "why the unit has no throughput figure although the grid asked for one"),
    ("cv_ttft", F, "coefficient of variation of ttft over repeats"),
    ("cv_decode", F, "coefficient of variation of per-repeat mean decode gap"),
    ("noisy_timing", B, "cv_ttft or cv_decode over 5%"),
    ("ttft_ms_ci_low", F, "time to first token, 95% interval on the mean over timed runs (Student t), low end"),
    ("ttft_ms_ci_high", F, "time to first token, 95% interval, high end"),
    ("decode_ms_ci_low", F, "decode ms/token, 95% interval on the mean over timed runs (each run's mean gap a "
                            "sample; Student t), low end"),
    ("decode_ms_ci_high", F, "decode ms/token, 95% interval, high end"),
    ("decode_ci_rel_halfwidth", F, "half the decode interval's width over its mean"),
    ("repeats_done", I, "timed runs made (generation.repeats, or as many as `auto` needed)"),
    ("repeats_stop", S, "why timing stopped: fixed (the grid's number) | target (interval narrow enough) | "
                        "max_repeats | max_seconds"),
    ("ttft_ms_samples", LF, "raw: ttft of each repeat"),
    ("decode_ms_samples", LF, "raw: every decode gap of every repeat"),
    ("e2e_s_samples", LF, "raw: end-to-end seconds of each repeat"),
    ("energy_j_per_prefill_token", F, "joules per prompt token, from a loop of prefill-only runs of at least 2 s "
                                      "(NVML's total-energy counter; see energy_method)"),
    ("energy_j_per_prefill_token_bound", F, "± joules: the most the counter's update interval can move the figure "
                                            "(one update's energy at the loop's mean power)"),
    ("energy_j_per_decode_token", F, "joules per generated token after the first: the energy window's generations "
                                     "less their prefills', over their decode tokens"),
    ("energy_j_per_decode_token_bound", F, "± joules: the most the counter's update interval can move the figure "
                                           "(one update's energy at each window's mean power)"),
    ("power_mean_w", F, "the unit's GPUs' mean power (summed) over the energy window's generations"),
    ("tokens_per_kwh", F, "generated tokens per kilowatt-hour over the energy window (prefill included)"),
    ("energy_window_j", F, "joules of the energy window (every GPU the unit holds): the timed runs, and untimed ones after them where they "
                           "lasted under 2 s (energy_runs in all)"),
    ("energy_window_s", F, "seconds of the energy window"),
    ("energy_runs", I, "generations in the energy window (repeats_done timed, the rest untimed)"),
    ("energy_counter_update_ms", F, "ms between updates of NVML's energy counter, measured once per GPU and process "
                                    "(100 on an H200)"),
    ("energy_timed_j", F, "rows of measurements before the energy window (no energy_window_j): joules of all timed "
                          "runs together, however short"),
    ("energy_method", S, "how the energy was read (NVML's counter moves in steps of 100 ms on an H200: read around "
                         "windows of 2 s at least, the generations' and a prefill-only loop's)"),
    ("energy_missing", S, "why there is no energy (CPU: no counter; an older GPU)"),
    ("usd_per_million_tokens", F, "with the grid's cost.usd_per_gpu_hour: dollars per million generated tokens at "
                                  "the cell's end-to-end throughput"),
    ("warmup_s", F, "seconds of the cell's warm-up runs (the last one measures memory)"),
    ("warmup_runs_s", LF, "seconds of each warm-up run (a first run slower than the rest pays one-time work)"),
    ("memory_measured_in", S, "which run the memory columns come from: the last warm-up run (on an emptied "
                              "allocator cache) or, with no warm-up, a run after the timed runs"),
    ("timed_s", F, "seconds of its timed runs (host clock, syncs included)"),
    ("energy_untimed_s", F, "seconds of untimed generations after the timed runs, filling the energy window "
                            "(GPU only)"),
    ("energy_prefill_s", F, "seconds of the prefill-only loop for energy (GPU only)"),
    ("memory_run_s", F, "seconds of a memory run of its own (only with no warm-up; else in warmup_s)"),
    ("profile_s", F, "seconds of the profiled decode step (generation.profile)"),
    ("top_kernels", KERNELS, "with generation.profile: one decode step's top CUDA kernels by GPU time (CPU: operators "
                             "by CPU time): name, calls, time_us"),
    # memory
    ("kv_cache_bytes", I, "analytic KV bytes at the end of generation: 2 x layers x kv_heads x head_dim x cached "
                          "tokens x batch x bytes; quantized: bits/8 + a scale and a zero point per group in "
                          "the activation dtype, the residual tokens at full precision"),
    ("compile_s", F, "compiled decode: seconds of the first run, compilation included (not in any latency column)"),
    ("cudagraph_skips", I, "compiled decode on a GPU: times inductor ran the step without CUDA graphs over the "
                           "cell (its cudagraph_skips counter; 0: graphs throughout); empty on CPU, where none are "
                           "asked for"),
    ("kv_cache_tensor_bytes", I, "measured: bytes the cache's tensors hold at the end of generation (quantized "
                                 "states, scales and zero points, residual)"),
    ("kv_bytes_per_token", F, "kv_cache_tensor_bytes / (cached tokens x batch)"),
    ("kv_bytes_per_token_analytic", F, "kv_cache_bytes / (cached tokens x batch)"),
    ("kv_cache_growth_bytes", I, "GPU allocated after decode minus before prefill (vLLM: the cell's KV blocks)"),
    ("kv_pool_bytes", I, "vLLM: the KV pool it was given (a setting: sized to the unit's largest cell), allocated "
                         "whole at start; a cell's peak counts only its own blocks of it"),
    ("kv_block_tokens", I, "vLLM: tokens per KV block"),
    ("kv_block_bytes", I, "vLLM: bytes of one KV block (keys and values of every layer)"),
    ("memory_before_bytes", I, "GPU allocated before prefill (weights and leftovers)"),
    ("prefill_peak_bytes", I, "peak GPU allocated during prefill, summed over the unit's GPUs (peak counters reset "
                            "before)"),
    ("decode_peak_bytes", I, "peak GPU allocated during decode, summed over the unit's GPUs (peak counters reset "
                           "before)"),
    ("peak_bytes", I, "max of the two phase peaks"),
    ("peak_reserved_bytes", I, "peak reserved by PyTorch's caching allocator during decode"),
    ("alloc_retries", I, "caching-allocator retries (cache freed, cudaMalloc retried) in the unit's process so far; "
                         "> 0 with peak_reserved_bytes near the card's size means fragmentation"),
    ("nvml_process_bytes", I, "this process's GPU memory per NVML (null where NVML cannot see processes)"),
    ("nvml_device_used_bytes", I, "the whole GPU's used memory per NVML"),
    ("rss_bytes", I, "process resident memory after the cell"),
    ("peak_rss_bytes", I, "process peak resident memory so far"),
    ("kv_layers", I, "layers holding a KV cache"),
    ("kv_heads", I, "key/value heads"),
    ("head_dim", I, "head dimension"),
    ("kv_bytes_per_element", I, "bytes of a full-precision cached key or value element (a quantized cache's residual)"),
    # distance to the hardware limit
    ("decode_bytes_per_step", I, "bytes a decode step must read: weights (less unread embedding) + mean KV cache"),
    ("achieved_bandwidth_gbs", F, "decode_bytes_per_step / decode step time"),
    ("peak_bandwidth_gbs", F, "the device's peak memory bandwidth"),
    ("peak_bandwidth_source", S, "datasheet (known GPU) | measured-copy (large device copy)"),
    ("bandwidth_fraction", F, "achieved / peak bandwidth"),
    ("decode_ms_floor", F, "decode_bytes_per_step at peak bandwidth: the fastest a step could be"),
    # environment fingerprint
    ("device", S, "cuda | cpu"),
    ("gpu_name", S, "CUDA device name"),
    ("gpu_count", I, "GPUs visible to the worker"),
    ("gpu_uuid", S, "UUID of the worker's GPU (distinct per physical GPU)"),
    ("gpu_memory_bytes", I, "the GPU's total memory"),
    ("cuda_visible_devices", S, "CUDA_VISIBLE_DEVICES as Ray set it"),
    ("driver_version", S, "NVIDIA driver"),
    ("cuda_version", S, "CUDA version of torch"),
    ("torch_version", S, ""), ("transformers_version", S, ""), ("bitsandbytes_version", S, ""),
    ("accelerate_version", S, ""), ("python_version", S, ""),
    ("cpu_model", S, ""), ("cpu_count", I, ""), ("torch_threads", I, "intra-op threads of the worker"),
    ("sdpa_backends", S, "attention backends torch may pick from, in its order (which runs depends on the shapes; "
                         "cudnn builds a plan per sequence length: a process's first generation is slower)"),
    ("cuda_alloc_conf", S, "PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF of the worker ('' = PyTorch's default); "
                           "expandable segments change how much memory fragmentation holds"),
    ("gpu_other_processes", I, "other processes NVML saw on the unit's GPU when the cell started or ended (0: the "
                               "GPU was the unit's alone; null on CPU or where NVML cannot see this process)"),
    ("gpu_other_process_bytes", I, "GPU memory those processes held"),
    ("gpu_other_pids", S, "their process ids"),
    ("cpus_per_task", F, "CPUs the unit asked Ray for (on CPU, fewer than a node lets units share cores)"),
    ("host_load_1m", F, "the host's 1-minute load average when the cell's runs ended (launch-bound decode slows "
                        "when other units share the host's CPUs)"),
    ("host_cpus", I, "CPUs the unit's process may run on (its affinity; a campaign beside another on one host gets "
                     "its share)"),
    ("host_other_busy_cpus", F, "how many of those CPUs other processes kept busy over the timed runs, on average "
                                "(Linux /proc/stat less the unit's own CPU time; null elsewhere, and where the timed "
                                "runs took under 0.25 s together: it counts in 10 ms ticks per CPU). Host-bound decode "
                                "(eager on a GPU, compiled cells flagged host-bound) slows when they take them all"),
    ("host_other_busy_cpus_max", F, "the same over the busiest stretch of timed runs (each run, or consecutive runs "
                                    "together up to 0.25 s)"),
    ("host_probe_before_ms", F, "the host's pace for plain Python just before the timed runs: the median ms of 5 runs "
                                "of a fixed loop (tasks/host_cpu.probe_ms). It moves with what moves a host-paced "
                                "decode step and /proc/stat cannot see (a busy hyperthread sibling, the clock); compare "
                                "it between cells of one host only"),
    ("host_probe_after_ms", F, "the same just after the timed runs"),
    ("host", S, "host name of the worker"),
    ("worker_pid", I, "process id of the worker"),
]

SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in COLUMNS])
NAMES = [n for n, _, _ in COLUMNS]
# measured once per unit and reused by key (quality_key): perplexity, its windows and interval, the distance
QUALITY_COLUMNS = ("perplexity", "ppl_batch_size", "ppl_batch_invariant", "ppl_ci_low", "ppl_ci_high",
                   "ppl_window_nll", "ppl_window_tokens", "ppl_windows", "ppl_tokens_scored", "ppl_corpus_tokens",
                   "ppl_s", "ppl_tokens_per_s", "kl_mean", "kl_median", "kl_p90", "kl_p99", "kl_max",
                   "top1_agreement", "delta_p_mean", "delta_p_rms", "ln_ppl_ratio", "ln_ppl_ratio_ci_low",
                   "ln_ppl_ratio_ci_high", "distance_positions", "distance_reference", "distance_missing")


STATUSES = ("ok", "error", "oom", "timeout", "skipped")


def table_problem(table: pa.Table) -> str | None:
    """Why a table is not rows of this schema (None when it is): every column one of the schema's with its type,
    a cell key and a status the schema knows on every row."""
    types = dict(zip(NAMES, SCHEMA.types))
    for field in table.schema:
        if field.name not in types:
            return f"a column {field.name!r} the schema does not have"
        if field.type != types[field.name] and not pa.types.is_null(field.type):
            return f"column {field.name!r} is {field.type}, the schema's is {types[field.name]}"
    if "cell_key" not in table.column_names or "status" not in table.column_names:
        return "no cell_key or status column"
    bad = set(table.column("status").to_pylist()) - set(STATUSES)
    if bad:
        return f"status {str(sorted(map(str, bad))[0])[:20]!r} is not one of {', '.join(STATUSES)}"
    if None in table.column("cell_key").to_pylist():
        return "a row without a cell key"
    return None


def row_problem(stem: str, table: pa.Table) -> str | None:
    """Why a Parquet file in `cells/` is not the row of the cell its name claims (None when it is): one row of this
    schema whose stored cell key equals the file's name. A file that is not is set aside and named, never counted."""
    if table.num_rows != 1:
        return f"{table.num_rows} rows (a cell file holds one)"
    problem = table_problem(table)
    if problem:
        return problem
    key = table.column("cell_key")[0].as_py()
    if key != stem:
        return f"its row is of cell {str(key)[:40]!r}, not of the cell its name claims"
    return None


def study_problem(table: pa.Table) -> str | None:
    """Why a study's cells.parquet is not one row per cell and machine of this schema (None when it is)."""
    problem = table_problem(table)
    if problem:
        return problem
    keys = table.column("cell_key").to_pylist()
    where = [g or h for g, h in zip(*(table.column(c).to_pylist() if c in table.column_names else [None] * len(keys)
                                       for c in ("gpu_uuid", "host")))]
    if len(set(zip(keys, where))) != len(keys):
        return "a cell on two rows of one machine (a study keeps each cell's newest row per machine)"
    return None


def markdown() -> str:
    lines = ["# Results schema", "",
             "One row per cell in `<output>/cells/*.parquet` (one file per cell). Generated by "
             "`python -m orchestrator schema` from `common/schema.py`.", "",
             "| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{n}` | {t} | {d.replace('|', chr(92) + '|')} |" for n, t, d in COLUMNS]
    return "\n".join(lines) + "\n"
