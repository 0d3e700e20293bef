#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, the C++ kernel test (ctest), the same test
# under AddressSanitizer/UBSan, then pytest (the CUDA tests run too when a GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build/cmake -G Ninja -DPython_EXECUTABLE="$(command -v python)" > /dev/null
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure
# The same C++ kernel test under AddressSanitizer and UBSan (~2 min, mostly the build): any
# out-of-bounds access, use after free or undefined behaviour in a CPU kernel fails it.
# Leak checking stays on: torch's libraries free what this program makes them allocate.
cmake -S . -B build/asan -G Ninja -DQAMW_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPython_EXECUTABLE="$(command -v python)" > /dev/null
cmake --build build/asan
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build/asan --output-on-failure
python -m pytest tests -q "$@"
