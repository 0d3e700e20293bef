#!/usr/bin/env bash
# The whole GPU check in one call, on a machine with an NVIDIA GPU, nvcc and the CUDA build of
# torch (it installs nothing: it builds against the torch it finds). In order: the build, the
# op tests on CUDA against the reference, compute-sanitizer's memcheck, racecheck and initcheck
# over the CUDA op tests, and the op benchmarks against PyTorch/cuBLAS. Every step's log, a
# summary and the benchmark JSON go to OUT (default benchmarks/results/gpu-DATE-GPU).
#   bash scripts/gpu_check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU is visible to torch; nothing to check" >&2
  exit 2
fi
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out=${1:-benchmarks/results/gpu-$(date +%Y-%m-%d)-$gpu}
mkdir -p "$out"
: > "$out/summary.txt"
failed=0

# step NAME COMMAND...: runs COMMAND with its output in OUT/NAME.log and records the outcome.
step() {
  local name=$1 start=$SECONDS rc=0
  shift
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1 || rc=$?
  tail -n 3 "$out/$name.log"
  if [ "$rc" -eq 0 ]; then
    echo "$name: ok ($((SECONDS - start)) s)" >> "$out/summary.txt"
  else
    echo "$name: FAILED, exit $rc ($((SECONDS - start)) s)" >> "$out/summary.txt"
    failed=1
  fi
}

sanitize() {
  compute-sanitizer --tool "$1" --error-exitcode 1 --print-limit 20 \
    python -m pytest tests/test_ops.py -q -x -p no:cacheprovider -k "$2"
}

step build env MAX_JOBS="$(nproc)" python setup.py build_ext --inplace
step tests python -m pytest tests/test_ops.py tests/test_codecs.py tests/test_error_feedback.py \
  -q -p no:cacheprovider
step memcheck sanitize memcheck cuda
# racecheck and initcheck are far slower: the kernels with shared memory and reductions.
step racecheck sanitize racecheck "cuda and (hadamard or gemv)"
step initcheck sanitize initcheck "cuda and (gemv or dequantize or pack)"
step bench python benchmarks/bench_ops.py --device cuda --out "$out/ops_cuda.json"

{ echo "device: $gpu"; echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "command: bash scripts/gpu_check.sh $*";
  python -c "import torch; print('torch:', torch.__version__)"; } >> "$out/summary.txt"
cat "$out/summary.txt"
exit "$failed"
