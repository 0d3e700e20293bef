#!/usr/bin/env bash
# The main job: the default model (SmolLM2-135M-Instruct, offline) quantized with QAM-W at
# 5.5, 4 and 3.5 bits per weight with every quality lever (the -best configs: error feedback,
# whole-dimension rotation, bit allocation), AAAC INT4 and RTN INT4 g128; prints the quality
# table and writes it as JSON + markdown + PNG, plus a constellation picture.
# A shorter evaluation slice than the recorded results (benchmarks/quality.py: 32768 tokens).
#   OUT=prefix  EVAL_TOKENS=n  scripts/main_job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-qamw_results/main_job}
EVAL_TOKENS=${EVAL_TOKENS:-8192}
python -m qamw_ext eval --configs qamw-5.5-best,qamw-4-best,qamw-3.5-best,aaac-int4,rtn-int4-g128 \
    --eval-tokens "$EVAL_TOKENS" --out "$OUT" --no-progress
python -m qamw_ext plot constellation --bits 8 --out "${OUT}_constellation_qam8.png"
