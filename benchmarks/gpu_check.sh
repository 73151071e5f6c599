#!/usr/bin/env bash
# The GPU check as one command on a machine with an NVIDIA card and no network (the device
# tool's), from the bundle that scripts/gpu-bundle makes here:
#
#   scripts/gpu-bundle                       # here: .gpu/ (pruned llama.cpp, wheels), < 64 MiB
#   benchmarks/gpu_check.sh                  # there, with .gpu carried: build, check, table
#   benchmarks/gpu_check.sh --cpu            # here: the same steps with a CPU build, no checks
#   CUDA_ARCH=90 benchmarks/gpu_check.sh --build-only   # here, with nvcc: the CUDA build only
#
# Steps: our missing packages from .gpu/wheels into a target folder; llama.cpp's library
# built from .gpu/llama.cpp with CUDA for this card only (CUDA_ARCH, default: the card's,
# from nvidia-smi) into a build folder; llama-cpp-python's Python package from
# .gpu/python pointed at it (LLAMA_CPP_LIB_PATH); then benchmarks/gpu_check.py, which holds
# all but 12 GiB of the card and prints the table. Extra arguments go to gpu_check.py.
# Results land in $OUT (the device tool's folder) when it is set, else in out/gpu-check.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=cuda
rehearsal=no
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu; rehearsal=yes; shift ;;
    --build-only) rehearsal=yes; shift ;;
    *) break ;;
  esac
done
bundle=${GPU_BUNDLE:-.gpu}
work=${GPU_WORK:-/tmp/executor-gpu}
out=${OUT:-out/gpu-check}
mkdir -p "$work" "$out"
if [ ! -f "$bundle/llama.cpp/CMakeLists.txt" ] || [ ! -d "$bundle/wheels" ]; then
  echo "gpu_check: no bundle at $bundle: run scripts/gpu-bundle first (and carry .gpu)" >&2
  exit 2
fi
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started ))s] $*"; }

python=python3
site="$work/site"
for_python=()
if [ "$rehearsal" = yes ]; then
  # Here: prove the wheels install for the GPU machine's Python 3.12 (pip unpacks them for
  # it), then run on this machine's Python with its own packages (.venv).
  for_python=(--only-binary=:all: --python-version 3.12 --implementation cp)
  site="$work/site-3.12"
  python=${GPU_PYTHON:-.venv/bin/python}
fi
stamp "installing $(ls "$bundle"/wheels/*.whl | wc -l) wheels into $site"
rm -rf "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  "${for_python[@]}" --target "$site" "$bundle"/wheels/*.whl

if [ "$mode" = cuda ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
  command -v nvcc >/dev/null || { echo "gpu_check: nvcc not found (the CUDA toolkit)" >&2; exit 3; }
  arch=${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
  flags=(-DGGML_CUDA=on "-DCMAKE_CUDA_ARCHITECTURES=$arch" -DGGML_NATIVE=ON)
else
  read -r -a flags <<<"$(scripts/llama-cmake-args)"
fi
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
build="$work/build-$mode"
stamp "building llama.cpp ($mode ${flags[*]}) in $build"
cmake -S "$bundle/llama.cpp" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF "${flags[@]}" \
  >"$work/cmake-$mode.log" 2>&1 || { tail -n 30 "$work/cmake-$mode.log" >&2; exit 1; }
cmake --build "$build" --target llama -j "$(nproc)" >"$work/build-$mode.log" 2>&1 \
  || { grep -E "error" "$work/build-$mode.log" | tail -n 20 >&2; exit 1; }
lib=$(dirname "$(find "$build" -name 'libllama.so' | head -1)")
stamp "built $lib: $(ls "$lib" | grep -c '\.so$') libraries"

export LLAMA_CPP_LIB_PATH="$lib"
export PYTHONPATH="$PWD/$bundle/python:$PWD"
[ "$rehearsal" = no ] && PYTHONPATH="$site:$PYTHONPATH"
"$python" - "$mode" <<'EOF'
import sys
import llama_cpp
offload = bool(llama_cpp.llama_supports_gpu_offload())
print(f"llama-cpp-python {llama_cpp.__version__} from {llama_cpp.__file__}; GPU offload: {offload}")
if sys.argv[1] == "cuda" and not offload:
    sys.exit("gpu_check: the CUDA build cannot offload")
EOF
if [ "$mode" = cuda ] && [ "$rehearsal" = yes ]; then
  stamp "CUDA build done (no checks: --build-only)"
  exit 0
fi
if [ "$mode" = cpu ]; then
  # The rehearsal ends with executor itself on this build: one real load and a few tokens.
  "$python" -m executor doctor || true
  "$python" - <<'EOF'
import json, subprocess, sys, tempfile, os
from pathlib import Path
with tempfile.TemporaryDirectory() as tmp:
    env = {**os.environ, "EXECUTOR_DB": f"{tmp}/db.sqlite", "EXECUTOR_CTX": "512"}
    p = Path(tmp, "p.jsonl"); p.write_text('{"prompt": "Hello", "max_tokens": 4}\n')
    cli = [sys.executable, "-m", "executor"]
    subprocess.run([*cli, "submit", str(p)], env=env, check=True, capture_output=True)
    subprocess.run([*cli, "run", "--until-empty"], env=env, check=True)
    out = subprocess.run([*cli, "export", "1"], env=env, check=True, capture_output=True, text=True)
    print("executor on the bundle's build:", json.loads(out.stdout)["output"][:40])
EOF
  stamp "rehearsal done"
  exit 0
fi
stamp "running benchmarks/gpu_check.py $*"
"$python" benchmarks/gpu_check.py --json "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
stamp "done"
