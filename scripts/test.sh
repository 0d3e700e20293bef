#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up, the C++ kernel tests (ctest: the CPU kernels,
# and the CUDA kernels run by the CPU emulation in tests/cpp/cuda_emulator), the same tests
# under AddressSanitizer/UBSan, then pytest (the CUDA tests run too when a GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build/cmake -G Ninja -DPython_EXECUTABLE="$(command -v python)" > /dev/null
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure
# The same C++ kernel tests under AddressSanitizer and UBSan (~2 min): any out-of-bounds
# access, use after free or undefined behaviour in a CPU kernel, or in a CUDA kernel's global
# or dynamic shared memory under the emulation, fails them.
# Leak checking stays on: torch's libraries free what this program makes them allocate.
cmake -S . -B build/asan -G Ninja -DQAMW_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPython_EXECUTABLE="$(command -v python)" > /dev/null
cmake --build build/asan
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build/asan --output-on-failure
python -m pytest tests -q "$@"
