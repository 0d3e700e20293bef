#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, the C++ kernel test (ctest), then pytest
# (the CUDA tests run too when a GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build/cmake -G Ninja -DPython_EXECUTABLE="$(command -v python)" > /dev/null
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure
python -m pytest tests -q "$@"
