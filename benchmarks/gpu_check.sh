#!/usr/bin/env bash
# One command for a CUDA machine: build llama-cpp-python with CUDA in its own venv, then run
# benchmarks/gpu_check.py (plan vs measured VRAM at caps of 8, 10 and 11.5 GiB on a card
# limited to 12 GiB). Extra arguments go to the script, e.g. --caps 6GiB,9GiB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
fi
if ! "$VENV/bin/python" -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' 2>/dev/null; then
  # CUDA build: needs nvcc on PATH (or CUDACXX); takes several minutes on 16 cores.
  export PATH="$PATH:/usr/local/cuda/bin"
  CMAKE_ARGS="-DGGML_CUDA=on" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install --quiet --no-cache-dir --force-reinstall "llama-cpp-python==0.3.36"
fi
"$VENV/bin/pip" install --quiet -e .
"$VENV/bin/python" benchmarks/gpu_check.py "$@"
