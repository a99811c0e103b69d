#!/usr/bin/env bash
# The GPU runs of docs/results/, one step per call of the device tool (see DEVELOPERS.md and ../shared/device/README.md).
# Stage first (here): ../shared/device/stage.sh --model --with-deps "ray[default]==2.60.0" <wheels of bitsandbytes 0.50.2,
#   gguf, pydantic 2.14 (+ pydantic-core, annotated-types, typing-inspection, typing-extensions), nvidia-ml-py>
# then on the host:  bash .stage/part-I/unstage.sh I  for I = 1..N, then  bash bench/gpu.sh STEP
#   env       versions, GPUs; warm the model cache (GGUF conversion, synthetic OPT-125M) outside the timed sweeps
#   ppl       bench/perplexity_pass.py: full WikiText-2 pass, fp16, batched vs one window at a time
#   sweep G N grid.yaml   the sweep on GPUs G (e.g. 0,1) as sweep name suffix N, embedded Ray, results tarred to $OUT
#   job       ray start --head + ray job submit of a small sweep, as the README documents it
#   phaseC    (second session) the item-1 grid and the llama-2-7b grid as two sweeps sharing one Ray head on all GPUs
#             (--address auto), stopped at DEADLINE s and resumed by the next call; then the driver-overhead bench
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_AUTH_MODE=disabled
export QSWEEP_CACHE=/tmp/qsweep-cache TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
step=${1:-env}; shift || true
watch() {  # DIR NAME: until DIR/all.done or DEADLINE s, tar DIR (less its src/) to $OUT/NAME.tgz each minute and at
  # the end, so that a call cut short still returns the latest
  local dir=$1 name=$2 end=$((SECONDS + ${DEADLINE:-570})) last=-60
  while :; do
    local finished=0; { [ -f "$dir/all.done" ] || [ $((end - SECONDS)) -lt 5 ]; } && finished=1
    if (( finished || SECONDS - last >= 60 )); then
      tar czf "$OUT/$name.tgz.part" -C "$dir" --exclude=src . 2>/dev/null && mv "$OUT/$name.tgz.part" "$OUT/$name.tgz"
      last=$SECONDS
    fi
    (( finished )) && break
    sleep 3
  done
}
case $step in
  env)
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    # pypcre (gptqmodel needs it) is an sdist with a C extension: built here, against the host's Python
    ls /tmp/stage/wheels/pypcre-*.whl > /dev/null 2>&1 || { python3 -m pip wheel -q --no-deps --no-build-isolation \
      .stage/extra/pypcre-0.6.4.tar.gz -w /tmp/stage/wheels 2>&1 | tail -2; python3 -m pip install -q --no-deps --target /tmp/site /tmp/stage/wheels/pypcre-*.whl 2>&1 | tail -2; }
    python3 -c "import torch, transformers, bitsandbytes, ray, pydantic, gguf, pynvml; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__, 'ray', ray.__version__, 'pydantic', pydantic.__version__)"
    for m in torchao optimum.quanto hqq pcre gptqmodel; do python3 -c "import $m; print('$m', getattr($m, '__version__', 'ok'))" 2>&1 | grep -vE "INFO|WARN|^\s*$|│|┌|└|─" | tail -1; done
    which nvcc gcc; ls /usr/local/cuda*/bin/nvcc 2>/dev/null
    nproc; free -g | head -2
    python3 - <<'PY'
import time
from tasks import models
t = time.time(); print(models.gguf_folder("/tmp/stage/models/SmolLM2-135M-Instruct.Q4_1.gguf"), round(time.time() - t, 1), "s")
t = time.time(); print(models.synthetic_folder("opt-125m", "cuda:0"), round(time.time() - t, 1), "s")
t = time.time(); print(models.synthetic_folder("llama-2-7b", "cuda:0"), round(time.time() - t, 1), "s")
PY
    ;;
  ppl)
    python3 bench/perplexity_pass.py --device cuda --dtype fp16 --batch 8 --gguf /tmp/stage/models/SmolLM2-135M-Instruct.Q4_1.gguf --data /tmp/stage/data/wikitext-2-raw/wiki.test.raw | tee "$OUT/ppl_pass.json"
    ;;
  sweep)
    gpus=$1 suffix=$2 grid=$3; shift 3
    n=$(echo "$gpus" | tr ',' '\n' | wc -l)
    out=results/$suffix
    start=$(date +%s.%N)
    CUDA_VISIBLE_DEVICES=$gpus python3 -m orchestrator sweep "$grid" --output "$out" "$@" > "$OUT/$suffix.log" 2>&1
    code=$?
    echo "$suffix: exit $code, $n GPU(s) [$gpus], command wall $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
    tail -25 "$OUT/$suffix.log"
    tar czf "$OUT/$suffix.tgz" "$out" "$OUT/$suffix.log" 2>/dev/null
    ;;
  job)
    ray=/tmp/site/bin/ray
    $ray start --head --num-gpus=4 --disable-usage-stats > "$OUT/job.log" 2>&1
    $ray status >> "$OUT/job.log" 2>&1
    $ray job submit --working-dir . -- python3 -m orchestrator sweep examples/gpu-one.yaml --output /tmp/job-out \
      --set 'models=[{gguf: /tmp/stage/models/SmolLM2-135M-Instruct.Q4_1.gguf, label: smollm2-135m}]' \
      --set 'precisions=[fp16, nf4]' --set 'generation.new_tokens=[64]' --set 'generation.batch_sizes=[1]' \
      --set perplexity.max_windows=8 --set name=job-submit >> "$OUT/job.log" 2>&1
    echo "job exit $?"; tail -30 "$OUT/job.log"
    $ray stop > /dev/null 2>&1
    tar czf "$OUT/job-submit.tgz" /tmp/job-out "$OUT/job.log" 2>/dev/null
    ;;
esac
# phase A of docs/results (one call): 1-GPU and 2-GPU scaling runs and the llama-2-7b run side by side on disjoint GPUs
if [ "$step" = phaseA ]; then
  tar czf "$OUT/gpu-one-4gpu.tgz" results/gpu-one-4gpu /tmp/out/gpu-one-4gpu.log 2>/dev/null
  (bash bench/gpu.sh sweep 0 scaling-1gpu examples/gpu-scaling.yaml > "$OUT/a1.txt" 2>&1) &
  (bash bench/gpu.sh sweep 1,2 scaling-2gpu examples/gpu-scaling.yaml > "$OUT/a2.txt" 2>&1) &
  (bash bench/gpu.sh sweep 3 llama7b examples/gpu-llama7b.yaml --set 'precisions=[nf4, fp16]' --set generation.repeats=1 > "$OUT/a3.txt" 2>&1) &
  deadline=$((SECONDS + ${DEADLINE:-540}))
  while [ $SECONDS -lt $deadline ] && [ -n "$(jobs -r)" ]; do sleep 5; done
  for s in scaling-1gpu scaling-2gpu llama7b; do [ -f "$OUT/$s.tgz" ] || tar czf "$OUT/$s.tgz" results/$s "$OUT/$s.log" 2>/dev/null; done
  cat "$OUT"/a1.txt "$OUT"/a2.txt | grep -E "exit|without failure"; grep -E "exit|ok |error|oom" "$OUT/llama7b.log" | tail -12
fi
# phase B (the next call): the 4-GPU scaling run alone, then ray job submit
if [ "$step" = phaseB ]; then
  bash bench/gpu.sh sweep 0,1,2,3 scaling-4gpu examples/gpu-scaling.yaml | grep -E "exit|without failure"
  timeout 200 bash bench/gpu.sh job | grep -E "exit|succeeded|SUCCEEDED|FAILED|Error|without failure" | head -20
fi
# phase C (second session, with unit processes forked from a warm fork server): the one-GPU grid (item 1) and the
# llama-2-7b grid (item 2) as two sweeps on one Ray head holding every GPU; each unit runs on one GPU. Interrupted at
# DEADLINE (SIGINT: finished cells are on disk) and resumed by calling the step again; tarred to $OUT each time.
if [ "$step" = phaseC ]; then
  ray=/tmp/site/bin/ray
  nvidia-smi --query-gpu=index,uuid --format=csv,noheader > "$OUT/gpus.csv"
  echo "GPU processes left from an earlier call:"; nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
  $ray status > /dev/null 2>&1 || $ray start --head --num-gpus=$(wc -l < "$OUT/gpus.csv") --disable-usage-stats > /dev/null 2>&1
  dl=${DEADLINE:-540}
  (timeout -s INT $dl python3 -m orchestrator sweep examples/gpu-llama7b.yaml --address auto --output results/llama7b \
     > "$OUT/llama7b.log" 2>&1; echo "llama7b exit $?" >> "$OUT/exits.txt") &
  sleep 3
  (timeout -s INT $dl python3 -m orchestrator sweep examples/gpu-one.yaml --address auto --output results/gpu-one \
     > "$OUT/gpu-one.log" 2>&1; echo "gpu-one exit $?" >> "$OUT/exits.txt") &
  wait
  cat "$OUT/exits.txt"; grep -hE "without failure|interrupted" "$OUT"/llama7b.log "$OUT"/gpu-one.log
  tar czf "$OUT/phaseC.tgz" results/llama7b results/gpu-one "$OUT"/*.log "$OUT/gpus.csv" 2>/dev/null
fi
# phase D (third session, a 2-GPU host): issue 5's llama-2-7b grid re-measured with measurement v2 on GPU 0 (its int8
# unit split into three sweeps so that the slowest cell runs first and alone), its fp16/nf4 units and then issue 6's
# sweeps (SmolLM2 every method, eager and compiled; the KV-cache axis): two chains of sweeps, one sweep at a time each,
# on one Ray head holding every GPU (--address auto), which hands GPUs to units as they free up. Stopped at DEADLINE
# (SIGINT; finished cells are on disk) and resumed by calling the step again; a finished sweep leaves
# results/NAME/.done and is not started again. Tarred to $OUT.
if [ "$step" = phaseD ]; then
  ray=/tmp/site/bin/ray
  nvidia-smi --query-gpu=index,uuid --format=csv,noheader > "$OUT/gpus.csv"
  $ray stop --force > /dev/null 2>&1  # a fresh head: its workers' fork servers start from this call's code
  $ray start --head --num-gpus=$(wc -l < "$OUT/gpus.csv") --disable-usage-stats > /dev/null 2>&1
  end=$((SECONDS + ${DEADLINE:-560}))
  on() {  # NAME GRID [--set ...]
    local name=$1 grid=$2; shift 2
    local left=$((end - SECONDS))
    [ -f results/$name/.done ] && return 0
    [ $left -gt 40 ] || { echo "$name: not started (${left} s left)" >> "$OUT/exits.txt"; return 0; }
    timeout -s INT $left python3 -m orchestrator sweep "$grid" --address auto --output results/$name "$@" \
      >> "$OUT/$name.log" 2>&1
    local code=$?; echo "$name exit $code" >> "$OUT/exits.txt"; [ $code = 0 ] && touch results/$name/.done
  }
  L=examples/gpu-llama7b.yaml
  I8="--set precisions=[int8] --set baseline=int8"
  ( on llama7b-int8-long16 $L $I8 --set 'generation.new_tokens=[1024]' --set 'generation.batch_sizes=[16]'
    on llama7b-int8-long1 $L $I8 --set 'generation.new_tokens=[1024]' --set 'generation.batch_sizes=[1]'
    on llama7b-int8-short $L $I8 --set 'generation.new_tokens=[128]' ) &
  sleep 3
  ( on llama7b-fp16-nf4 $L --set 'precisions=[fp16, nf4]'
    on methods examples/gpu-methods.yaml
    on kv-a examples/gpu-kv-cache.yaml --set 'generation.kv_cache=[native, hqq-int2]'
    on kv-b examples/gpu-kv-cache.yaml --set 'generation.kv_cache=[quanto-int4, hqq-int4]' ) &
  wait
  cat "$OUT/exits.txt"; grep -hE "without failure|interrupted" "$OUT"/*.log
  tar czf "$OUT/phaseD.tgz" results "$OUT"/*.log "$OUT/gpus.csv" 2>/dev/null
fi
# phase E (fourth session, a 4-GPU host): everything left for issues 5 and 6 as one background run on one Ray head
# holding every GPU, so that no unit is cut by a call's end: the first `phaseE` call starts `phaseE-run` (setsid: it
# outlives the call), every call watches until DEADLINE and tars /tmp/phaseE to $OUT each minute (a call cut short
# still returns the latest). On an H200 each sweep starts from the cells committed in docs/results, so only missing
# cells run (fourth session: int8 and nf4 at 1024 tokens for issue 5, then issue 6's grids; a later session: what
# that one left).
if [ "$step" = phaseE ]; then
  R=/tmp/phaseE; mkdir -p $R
  [ -f $R/launched ] || { touch $R/launched; setsid nohup bash bench/gpu.sh phaseE-run > $R/launcher.log 2>&1 < /dev/null & }
  watch $R phaseE
  cat $R/launcher.log | grep -vE "^\s*$" | tail -15; cat $R/exits.txt 2>/dev/null
  python3 bench/phase_status.py $R/results
fi
if [ "$step" = phaseE-run ]; then
  R=/tmp/phaseE; ray=/tmp/site/bin/ray
  mkdir -p $R/src $R/results && cp -r orchestrator tasks cluster reports templates examples bench pyproject.toml $R/src/
  if grep -q H200 <(nvidia-smi --query-gpu=name --format=csv,noheader); then  # cells measured on this GPU type
    D=docs/results/h200-2026-11-27
    for seed in llama7b:llama7b-v2 methods-llama7b:methods-llama7b methods:methods kv-a:kv-cache kv-b:kv-cache; do
      mkdir -p $R/results/${seed%%:*}/cells && cp $D/${seed#*:}/cells/*.parquet $R/results/${seed%%:*}/cells/
    done  # (cells of the other kv sweep are moved to that folder's history: not in its plan)
  fi
  nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv,noheader > $R/gpus.csv
  bash bench/gpu.sh env  # versions; pypcre built; the model cache warmed (GGUF conversion, synthetic models)
  cd $R/src; export PYTHONPATH=/tmp/site:$R/src
  $ray stop --force > /dev/null 2>&1
  # inductor's perf hints name each graph whose CUDA graphs were skipped, and why: they go to the Ray workers' logs
  # (the sweeps run with log_to_driver off), summed into cudagraphs.txt when the sweeps end
  export TORCH_LOGS=perf_hints
  $ray start --head --num-gpus=$(wc -l < $R/gpus.csv) --disable-usage-stats > /dev/null 2>&1 || echo "ray start failed"
  t0=$SECONDS
  run() {  # NAME GRID [--set ...]
    local name=$1 grid=$2; shift 2
    python3 -m orchestrator sweep "$grid" --address auto --output $R/results/$name "$@" > $R/$name.log 2>&1
    echo "$name exit $? after $((SECONDS - t0)) s" >> $R/exits.txt
  }
  # Ray does not serve concurrent drivers first come, first served (the fourth session's methods-llama7b units waited
  # 20 minutes behind SmolLM2's): the grid with the longest units left starts first, the rest after a head start
  # (fifth session: SmolLM2's torchao-int8dq compiled cell and 4-bit gptq, then Llama-2-7B's nine methods)
  run methods examples/gpu-methods.yaml & sleep 30
  run methods-llama7b examples/gpu-methods-llama7b.yaml & sleep 30
  run llama7b examples/gpu-llama7b.yaml & sleep 3
  run kv-a examples/gpu-kv-cache.yaml --set 'generation.kv_cache=[native, hqq-int2]' & sleep 3
  run kv-b examples/gpu-kv-cache.yaml --set 'generation.kv_cache=[quanto-int4, hqq-int4]' &
  wait
  grep -h "cudagraph" /tmp/ray/session_latest/logs/worker-*.err 2>/dev/null | sed 's/^.*\] //' | sort | uniq -c \
    > $R/cudagraphs.txt
  touch $R/all.done
fi
# fifth session: 4-bit gptq on Llama-2-7B again with `kernel: marlin` (auto picked Machete, which fetches CUTLASS from
# GitHub at first use and failed offline), one GPU, embedded Ray, in the background as phaseE; every call watches.
if [ "$step" = phaseF ]; then
  R=/tmp/phaseF; mkdir -p $R/results
  if [ ! -f $R/launched ]; then
    touch $R/launched; mkdir -p $R/src $R/results/methods-llama7b/cells
    cp -r orchestrator tasks cluster reports templates examples bench pyproject.toml $R/src/
    cp docs/results/h200-2026-11-27/methods-llama7b/cells/*.parquet $R/results/methods-llama7b/cells/  # fp16 is done
    setsid nohup bash -c "bash bench/gpu.sh env; cd $R/src && PYTHONPATH=/tmp/site:$R/src python3 -m orchestrator sweep \
      examples/gpu-methods-llama7b.yaml --output $R/results/methods-llama7b \
      --set 'precisions=[fp16, {name: gptq, bits: 4, calib_samples: 32, kernel: marlin}]'; touch $R/all.done" \
      > $R/launcher.log 2>&1 < /dev/null &
  fi
  watch $R phaseF
  grep -vE "^\s*$|Converting|Writing|Loading" $R/launcher.log | tail -25
fi
if [ "$step" = bench ]; then
  /tmp/site/bin/ray stop > /dev/null 2>&1
  python3 bench/driver_overhead.py --json "$OUT/driver_overhead.json" > /dev/null 2>&1; cat "$OUT/driver_overhead.json"
fi
