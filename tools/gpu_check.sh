#!/usr/bin/env bash
# What a session with a GPU runs (see the device tool): build the extension from source
# against the machine's torch, run the whole suite (CUDA variants included), run
# compute-sanitizer memcheck and racecheck over the CUDA tests, and the op benchmarks.
#   bash tools/gpu_check.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
WEAKSEG_CUDA_ARCHS="${WEAKSEG_CUDA_ARCHS:-90}" "$PY" -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -3
cd /tmp   # import the installed package, not the source tree
"$PY" -m weakseg info | tee "$OUT/info.txt"
cd - >/dev/null
"$PY" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -3
SAN="$CUDA_HOME/bin/compute-sanitizer"
if [ -x "$SAN" ]; then
  HYPOTHESIS_PROFILE=ci "$SAN" --tool memcheck --leak-check full --error-exitcode 9 \
    "$PY" -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/memcheck.txt" | tail -5
  # shared-memory races in the block-cooperative kernels (reductions, tiles)
  HYPOTHESIS_PROFILE=ci "$SAN" --tool racecheck --error-exitcode 9 \
    "$PY" -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/racecheck.txt" | tail -5
fi
"$PY" -m weakseg bench --device cuda --out "$OUT" 2>&1 | tail -40
