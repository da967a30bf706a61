#!/usr/bin/env bash
# The device checks of issue 19, as one prepared script for a lent GPU (15 min of device time a session).
# Run it from the repository root on the device machine, in two calls on the same warm machine:
#   device run (carry [".whl"], timeout 540):  bash tools/gpu_check.sh build test
#   device run (timeout 420):                   bash tools/gpu_check.sh bench
# Before: `bash tools/gpu_wheels.sh` here (diffusers, open_clip for the method benchmarks).
# Every stage has its own time limit, writes its log under $OUT (or benchmarks/results/gpu) and a line
# to $OUT/summary.txt; the summary is printed last. Stages: build test sanitize bench (default: all).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" WEAKSEG_CUDA_ARCHS="${WEAKSEG_CUDA_ARCHS:-90}"
PY="${PYTHON:-python3}"
STAGES=("$@"); [ ${#STAGES[@]} -eq 0 ] && STAGES=(build test sanitize bench)
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
SUM="$OUT/summary.txt"
stage() {  # stage NAME LIMIT_S COMMAND...: run, log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-22s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(tail -1 "$OUT/$name.log" | cut -c1-90)" | tee -a "$SUM"
  return 0
}
for s in "${STAGES[@]}"; do
  case $s in
    build)
      { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; date -u; } \
        > "$OUT/gpu.txt" 2>&1
      stage build 400 "$PY" -m pip install --no-build-isolation --no-deps -q -e .
      stage info 60 "$PY" -m weakseg info ;;
    test)
      # the CUDA variants first (they are what has never run), then the whole suite in parallel if time allows
      stage pytest_cuda 200 "$PY" -m pytest -q -x -p no:cacheprovider -m cuda tests
      stage pytest_all 240 "$PY" -m pytest -q -p no:cacheprovider -n 8 tests ;;
    sanitize)
      SAN="$CUDA_HOME/bin/compute-sanitizer"
      for tool in memcheck racecheck synccheck; do
        extra=(); [ $tool = memcheck ] && extra=(--leak-check full)
        HYPOTHESIS_PROFILE=ci stage "san_$tool" 150 "$SAN" --tool $tool "${extra[@]}" --error-exitcode 9 \
          "$PY" -m pytest -q -x -p no:cacheprovider -m cuda tests/test_erode.py tests/test_knn_vote.py \
          tests/test_kl_kmeans.py tests/test_refine_propagate.py tests/test_masked_area_pool.py
      done ;;
    bench)
      stage bench_ops 150 "$PY" -m weakseg bench --device cuda --out "$OUT"
      # the real architectures with random weights (they time as the real ones): iSeg on SD-2.1-base,
      # DiffSegmenter on SD-1.5, at 512^2
      stage bench_iseg 150 "$PY" benchmarks/bench_methods.py --device cuda --size 512 --images 2 --methods iseg \
        --model random:stabilityai/stable-diffusion-2-1-base --out "$OUT"
      stage bench_diffsegmenter 150 "$PY" benchmarks/bench_methods.py --device cuda --size 512 --images 2 \
        --methods diffsegmenter --model random:stable-diffusion-v1-5/stable-diffusion-v1-5 --out "$OUT"
      stage bench_synseg 90 "$PY" benchmarks/bench_synseg.py --device cuda --out "$OUT"
      stage export_onnx 90 "$PY" -m weakseg export diclip --format onnx --out /tmp/e2e --classes cat,dog,car \
        --set preset=tiny vce=false 'refine=[]' cam_source=patch
      stage bench_e2e 90 "$PY" -m weakseg bench e2e --model /tmp/e2e --engine torch onnx --device cuda --out "$OUT" ;;
    *) echo "unknown stage $s (build test sanitize bench)"; exit 2 ;;
  esac
done
echo "== summary ($(date -u +%FT%TZ))"; cat "$SUM"
