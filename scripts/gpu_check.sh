#!/usr/bin/env bash
# The whole GPU check in one call, on a machine with an NVIDIA GPU, nvcc and the CUDA build of
# torch (it installs nothing: it builds against the torch it finds). In order: the build, the
# GEMVs' main loops counted from their SASS (benchmarks/sass_loops.py), the CUDA
# op tests against the reference (K * 2^m Hadamard blocks included), compute-sanitizer's
# memcheck, racecheck and initcheck over small targeted selections of them, Nsight Compute's
# shared-memory wavefronts of each GEMV (benchmarks/profile_gemv.py), the op benchmarks
# (benchmarks/bench_ops.py --device cuda), the decode benchmark (benchmarks/bench_decode.py)
# and Nsight Compute's stall reasons of each GEMV, the tensor-core GEMVs' and the Hadamard
# transform's.
# Every step's log, a summary and the benchmarks' JSON and markdown go to OUT (default
# benchmarks/results/gpu-DATE-GPU).
#   bash scripts/gpu_check.sh [OUT]
#   DAO_FHT_SRC=DIR bash scripts/gpu_check.sh [OUT]   # also times Dao-AILab's FHT, from a checkout
#   GPU_CHECK_SKIP=ncu,ncu_stalls bash scripts/gpu_check.sh [OUT]   # leaves these steps out
# The whole run fits in GPU_CHECK_BUDGET_S seconds (default 540): every step runs under
# `timeout`, cut so that the benchmarks keep their time, and a step that fails or times out
# does not stop the later ones. The benchmarks write their JSON after each group of figures,
# so a time limit keeps what was measured. OUT holds a dozen files: to bring them back from a
# machine that returns few files, archive it (tar -czf ... OUT) after this script.
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
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-540}))

# step NAME LIMIT RESERVE COMMAND...: runs COMMAND under `timeout` with its output in
# OUT/NAME.log and records the outcome. The limit is LIMIT seconds, or less so that RESERVE
# seconds stay before the deadline for the steps after it; with under 10 s left it is skipped.
step() {
  local name=$1 limit=$2 reserve=$3 start=$SECONDS rc=0
  shift 3
  if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
    echo "$name: left out (GPU_CHECK_SKIP)" | tee -a "$out/summary.txt"
    return
  fi
  local left=$((deadline - SECONDS - reserve))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "$name: SKIPPED, out of time" | tee -a "$out/summary.txt"
    failed=1
    return
  fi
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=5 "$limit" "$@" > "$out/$name.log" 2>&1 || rc=$?
  tail -n 3 "$out/$name.log"
  if [ "$rc" -eq 0 ]; then
    echo "$name: ok ($((SECONDS - start)) s)" >> "$out/summary.txt"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "$name: TIMED OUT after ${limit} s" >> "$out/summary.txt"
    failed=1
  else
    echo "$name: FAILED, exit $rc ($((SECONDS - start)) s)" >> "$out/summary.txt"
    failed=1
  fi
}

# Seconds kept for the two benchmarks while the build, the tests and the sanitizer run (the
# decode benchmark, last, may use whatever is left). BENCH_OPS_ARGS: more bench_ops.py options
# (e.g. --dtypes bf16 --hadamard-blocks none, for a shorter run).
bench_ops_s=${BENCH_OPS_S:-90}
bench_decode_s=${BENCH_DECODE_S:-120}
read -ra bench_ops_args <<< "${BENCH_OPS_ARGS:-}"
benches=$((bench_ops_s + bench_decode_s))
pytest_ops=(python -m pytest tests/test_ops.py -p no:cacheprovider)
sanitizer=(compute-sanitizer --error-exitcode 1 --print-limit 20)

# Dao-AILab's fast-hadamard-transform, when DAO_FHT_SRC names a checkout of it: built while
# ours builds (one nvcc process: a core of many) and timed beside ops.hadamard in bench_ops.
if [ -n "${DAO_FHT_SRC:-}" ]; then
  step dao_fht 300 "$benches" python benchmarks/dao_fht.py "$DAO_FHT_SRC" &
  dao_build=$!
fi
step build 330 "$benches" env MAX_JOBS="$(nproc)" python setup.py build_ext --inplace
# The GEMV kernels' loops as built (SASS, cuobjdump): the instruction counts beside the
# figures they gave, k-blocks on tensor cores and runs of codes on CUDA cores.
step sass_loops 20 "$benches" bash -c 'for o in build/temp.*/csrc/cuda/{qamw_mma,aaac}.o; do
  python benchmarks/sass_loops.py "$o" --kernel gemv_mma_kernel; done
  python benchmarks/sass_loops.py build/temp.*/csrc/cuda/qamw.o --kernel qamw_gemv_kernel --op FFMA'
# Every CUDA case of the op tests: Hadamard blocks 2^m and K * 2^m (12 ... 30720, 576, 1536),
# the QAM-W GEMV and dequantize with K * 2^m blocks, AAAC, packing, nearest codeword.
step tests 90 "$benches" "${pytest_ops[@]}" -q -k cuda
# The sanitizer slows every kernel launch a hundredfold: a few cases per kernel family, the
# staged 2^14 blocks (CTAs striding over 300) and K * 2^m blocks included, and every
# tensor-core GEMV at batches 1, 5 and 16 (the families test with QAMW_GEMV_MMA=1, in clusters
# and alone; rotated once, batch 1 runs the kernels of batches 2-4); -v so that a timed-out log
# shows how far it got.
step memcheck 60 "$benches" "${sanitizer[@]}" --tool memcheck "${pytest_ops[@]}" -x -v -k \
  "cuda_gemv_kernel_families and 1 and not once or cuda and (hadamard_matches_reference and (2048- or 32768-) and dtype2 or many_large_blocks and 16384-dtype1 or k_blocks_match_reference and dtype2 or pack_unpack and 11-cuda or qamw_dequantize_and_gemv and (96-32 or 576-576 or 1152-576 or 3072-1536 or 1536-1536 or 72-12 or 160-80 or 960-480) and 8-cuda or aaac_dequantize_and_gemv and (192-64 or 512-128) or fused_siblings and (rows1-576-576-4 or rows2-1024-1024-11 or rows1-512-128-scale_dtype0))"
# racecheck and initcheck are slower still: the kernels with shared memory and reductions, at
# small sizes and 4-bit codes (on an H100 the selection with 3072 x 1536 and 1024 x 1024 ran
# past 25 s, and so did 11-bit codes, whose 128 KiB of codebook copies it checks store by
# store: three runs stopped in the first 11-bit 576 x 576 case).
step racecheck 25 "$benches" "${sanitizer[@]}" --tool racecheck "${pytest_ops[@]}" -x -v -k \
  "cuda and (k_blocks_match_reference and (576- or 1536-) and dtype2 or qamw_dequantize_and_gemv and (576-576 or 96-32) and 4-cuda or aaac_dequantize_and_gemv and 192-64 or fused_siblings and rows1-576-576-4)"
step initcheck 25 "$benches" "${sanitizer[@]}" --tool initcheck "${pytest_ops[@]}" -x -v -k \
  "cuda and (qamw_dequantize_and_gemv and (576-576 or 1536-1536 or 96-32) and 7-cuda or aaac_dequantize_and_gemv and 512-128 or pack_unpack and 11-cuda)"
# Shared-memory wavefronts, time, DRAM throughput and occupancy of each codec's batch-1 GEMV,
# against the predictions of benchmarks/smem_wavefronts.py (benchmarks/NOTES.md, GPU v1 and
# v2: two CTAs of 8 warps an SM, 25 % of warps active; 12.5 % at 11-12 bits, one CTA): the
# second call of each is the one to read.
step ncu 45 "$benches" env QAMW_GEMV_MMA=0 ncu --csv -k regex:gemv_kernel --metrics \
  l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__sass_inst_executed_op_shared_ld.sum,gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active \
  python benchmarks/profile_gemv.py
dao_args=()
if [ -n "${dao_build:-}" ]; then
  wait "$dao_build"
  grep -q "^dao_fht: ok" "$out/summary.txt" && dao_args=(--dao-fht-src "$DAO_FHT_SRC")
fi
step bench_ops "$bench_ops_s" "$bench_decode_s" python benchmarks/bench_ops.py --device cuda \
  "${dao_args[@]}" "${bench_ops_args[@]}" --out "$out/ops_cuda.json"
# Each config's decoder layer compiled once with torch.compile (Inductor fuses the glue between
# the linears), then the whole step in a CUDA graph. The rows are written as they come, the
# ones the targets need first (+fused: the conversion with fuse_siblings=true; +head=qamw-5.5:
# lm_head quantized too, at 5.5 bpw; +nopdl: the GEMVs launched without programmatic dependent
# launch; +gluepdl: Inductor's glue launched with it too; +mma: the GEMVs on tensor cores;
# +alone: QAM-W's batch-1 tensor-core GEMVs without clusters of CTAs; +once: their activation
# rotated once by a kernel of its own).
step bench_decode 300 0 python benchmarks/bench_decode.py --device cuda --compile \
  --configs bf16,qamw-4+fused,qamw-4+fused+alone,qamw-4+fused+once,qamw-4+fused+head=qamw-5.5,qamw-4+fused+mma,aaac-int4+fused,qamw-5.5+fused,qamw-5.5+fused+mma,aaac-int4+fused+mma,qamw-4+fused+nopdl,qamw-4+fused+gluepdl,qamw-4,bf16+fused,bf16+gluepdl,aaac-int4,qamw-5.5 \
  --out "$out/decode_cuda.json"
# Where each batch-1 GEMV's warps wait (stall reasons) and how often its schedulers issue: what
# bounds the kernels beyond bytes. Last, in whatever time is left. This step and `ncu` profile
# the CUDA-core kernels (QAMW_GEMV_MMA=0: QAM-W at 8 bits takes tensor cores at batch 1 by
# default), ncu_mma the tensor-core ones.
step ncu_stalls 60 0 env QAMW_GEMV_MMA=0 ncu --section WarpStateStats --section SchedulerStats \
  -k regex:gemv_kernel \
  python benchmarks/profile_gemv.py
# The tensor-core GEMVs (the default from batch 2, 8-bit QAM-W from 1, NVFP4 from 4;
# QAMW_GEMV_MMA=1 gives them every batch, batch 1 with the rotation in each CTA): throughput,
# stalls and issue rate at batches 1 and 16.
step ncu_mma 45 0 env QAMW_GEMV_MMA=1 ncu --section SpeedOfLight --section WarpStateStats \
  --section SchedulerStats -k regex:gemv_mma python benchmarks/profile_gemv.py --batches 1,16 \
  --codecs qamw-4,qamw-5.5,aaac-int4,aaac-nvfp4
# The same, with memory throughput and occupancy, for the Hadamard transform's blocks of 2^7
# (3x clone in the first H100 run), 2^12 (1.5x) and 2^14 (1.8x), 64 MiB of bf16 each.
step ncu_hadamard 30 0 ncu --section SpeedOfLight --section WarpStateStats --section Occupancy \
  -k regex:hadamard python -c "import torch; from qamw_ext import ops
x = torch.randn(8192, 4096, device='cuda', dtype=torch.bfloat16)
[ops.hadamard(x, b) for b in (128, 4096)]; ops.hadamard(x.view(-1, 16384), 16384)
torch.cuda.synchronize()"

{ echo "device: $gpu"; echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "command: bash scripts/gpu_check.sh $*";
  echo "settings: GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-540} BENCH_OPS_S=$bench_ops_s" \
    "BENCH_DECODE_S=$bench_decode_s BENCH_OPS_ARGS=\"${BENCH_OPS_ARGS:-}\" GPU_CHECK_SKIP=${GPU_CHECK_SKIP:-}";
  python -c "import torch; print('torch:', torch.__version__)"; } >> "$out/summary.txt"
cat "$out/summary.txt"
exit "$failed"
