// What the two QAM-W GEMV files share: qamw.cu (the launcher, the CUDA-core kernels, the
// rotation) and qamw_mma.cu (the tensor-core kernel).
#pragma once
#include "common.cuh"

namespace qamw::cuda {

inline int log2_of(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// QAM-W widths only (4..12 bits per pair, checked by the wrapper): every width is a kernel of
// its own, with compile-time shifts, and each costs compile time.
template <typename F>
void dispatch_qamw_bits(int bits, F&& f) {
  switch (bits) {
    case 4: f(IntC<4>{}); break;
    case 5: f(IntC<5>{}); break;
    case 6: f(IntC<6>{}); break;
    case 7: f(IntC<7>{}); break;
    case 8: f(IntC<8>{}); break;
    case 9: f(IntC<9>{}); break;
    case 10: f(IntC<10>{}); break;
    case 11: f(IntC<11>{}); break;
    default: f(IntC<12>{}); break;
  }
}

// Code j of a unit held as N little-endian words (j compile-time in the kernels' unrolled
// loops: the shifts are constants).
template <int BITS, int N>
__device__ __forceinline__ uint32_t chunk_code(const uint32_t (&w)[N], int j) {
  const int bit = j * BITS, word = bit >> 5, sh = bit & 31;
  uint32_t v = w[word] >> sh;
  if (sh + BITS > 32) v = __funnelshift_r(w[word], w[word + 1], sh);
  return v & ((1u << BITS) - 1u);
}

// Whether the tensor-core GEMV serves this call (mma_wanted) on this device: sm_80 or later,
// and row scales over whole k-blocks of 128 pairs (one scale a row, or Hadamard blocks of 256
// values and more) from batch 2, or over 32 or 64 pairs (blocks of 64 and 128) from batch 4.
bool qamw_use_mma(const QamwWeight& w, int64_t batch);

// The pairs a lane of the tensor-core GEMV decodes per row and k-block (mma.cuh's RUN).
constexpr int kQamwMmaRun = 32;

// The tensor-core GEMV of `batch` (<= 16) activation rows, rotated and formatted into B
// `fragments` (mma.cuh, RUN = kQamwMmaRun) for each of `rotations`: one per sibling, or one
// for all.
void qamw_gemv_mma(const QamwWeight& w, int rotations, int64_t batch, const uint2* fragments,
                   void* out, DType dtype, cudaStream_t stream);

}  // namespace qamw::cuda
