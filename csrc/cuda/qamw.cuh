// What the two QAM-W GEMV files share: qamw.cu (the launcher, the CUDA-core kernels, the
// rotation) and qamw_mma.cu (the tensor-core kernel).
#pragma once
#include "../hadamard_tables.h"
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
  // A byte in one instruction (a permute) where a shift and a mask take two.
  if constexpr (BITS == 8) return __byte_perm(w[j / 4], 0u, 0x4440u | (j % 4));
  const int bit = j * BITS, word = bit >> 5, sh = bit & 31;
  uint32_t v = w[word] >> sh;
  if (sh + BITS > 32) v = __funnelshift_r(w[word], w[word + 1], sh);
  return v & ((1u << BITS) - 1u);
}

// Index in shared memory of value j of a row of the rotated activation, with two padding
// floats after every 2^pad_shift values (kNoPadding: none).
constexpr int kNoPadding = 30;
__device__ __forceinline__ int padded_index(int j, int pad_shift) {
  return j + 2 * (j >> pad_shift);
}
struct PaddedIndex {
  int pad_shift;
  __device__ int operator()(int j) const { return padded_index(j, pad_shift); }
};

// Unnormalised Walsh-Hadamard transform, in place in shared memory, of `rows` rows of n values
// (row b at s + b * row_stride, value j at padded_index(j, pad_shift)), in blocks of `block`,
// over the index bits from `first_bit` up (stage_activation does the lower ones). Up to three
// stages are fused per barrier: each thread transforms 8 values in registers. From bit 5 up the
// 32 lanes of a warp read 32 consecutive values: no bank conflicts.
inline __device__ void fwht_shared(float* s, int rows, int n, int block, int row_stride,
                                   int pad_shift, int first_bit) {
  const int lb = __ffs(block) - 1;
  for (int lh = first_bit; lh < lb;) {
    const int r = lb - lh < 3 ? lb - lh : 3;
    const int h = 1 << lh;
    const int groups_per_row = n >> r;
    for (int g = threadIdx.x; g < rows * groups_per_row; g += blockDim.x) {
      const int b = g / groups_per_row, q = g - b * groups_per_row;
      // Group q: the 2^r values whose index bits [lh, lh + r) vary, the other bits from q.
      const int base = ((q >> lh) << (lh + r)) | (q & (h - 1));
      float* row = s + b * row_stride;
      int idx[8];
      float v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        idx[i] = padded_index(base + i * h, pad_shift);
        v[i] = i < (1 << r) ? row[idx[i]] : 0.0f;
      }
      if (r == 3) butterflies<3>(v);
      else if (r == 2) butterflies<2>(v);
      else butterflies<1>(v);
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < (1 << r)) row[idx[i]] = v[i];
    }
    __syncthreads();
    lh += r;
  }
}

// The low index bits stage_activation may transform for blocks of `pow2` (runs of K * 2^m
// blocks) in rows of n values: up to 5, the lanes' bits 3-4 needing n % 32 == 0.
__device__ __forceinline__ int staging_bits(int pow2, int n) {
  const int lb = __ffs(pow2) - 1, limit = n % 32 == 0 ? 5 : 3;
  return lb < limit ? lb : limit;
}

// Mixes, in place in shared memory, the K runs of P values of every block of K * P in `rows`
// rows of n values (row r at s + r * row_stride, value j at padded_index(j, pad_shift)):
// value (a, b) of a block becomes sum_c H[a][c] value (c, b), unnormalised, H the K mask rows of
// kHadamardMasks from `table`. Thread t computes output a = t % K of one column per round; a
// round covers whole columns and reads all their values before a barrier, then writes. K is a
// runtime loop bound: the GEMV's registers stay those of its main loop.
inline __device__ void mix_shared(float* s, int rows, int n, int K, int P, int table,
                                  int row_stride, int pad_shift) {
  const int per_round = blockDim.x / K;   // the CTA has at least K threads
  const int a = threadIdx.x % K, slot = threadIdx.x / K;
  const bool active = slot < per_round;
  const uint64_t mask = active ? kHadamardMasks[table + a] : 0;
  const int cols_per_row = n / K, columns = rows * cols_per_row;
  for (int c0 = 0; c0 < columns; c0 += per_round) {
    const int col = c0 + slot;
    const bool valid = active && col < columns;
    float y = 0.0f;
    float* dst = nullptr;
    if (valid) {
      const int r = col / cols_per_row, rc = col - r * cols_per_row;
      const int blk = rc / P, j0 = blk * K * P + (rc - blk * P);
      float* row = s + r * row_stride;
#pragma unroll 4
      for (int c = 0; c < K; ++c) {   // K is a multiple of 4
        const int j = j0 + c * P;
        const float v = row[padded_index(j, pad_shift)];
        y += (mask >> c & 1) ? -v : v;
      }
      const int j = j0 + a * P;
      dst = row + padded_index(j, pad_shift);
    }
    __syncthreads();  // every value of the round's columns is read
    if (valid) *dst = y;
    __syncthreads();
  }
}

// One activation row's rotation as the GEMVs apply it: value j of H(signs * x / channel_scale)
// * norm, H the Hadamard transform of blocks of order * pow2 (H_order's mask rows at
// kHadamardMasks[table]). x holds n values of `dtype`; signs and channel_scale may be null (a
// fused weight's siblings each have a channel scale, n floats apart); vec: stage_activation may
// use vector loads.
struct RotationArgs {
  const void* x;
  DType dtype;
  int n;
  const float* channel_scale;
  const int8_t* signs;
  float norm;
  bool vec;
  int order, pow2, table;
};

// Rotates values [first, first + count) of the row (with sibling `sibling`'s channel scale)
// into shared memory, value first + j at dst[padded_index(j, pad_shift)]: whole Hadamard blocks
// (first and count multiples of order * pow2, or count up to n), as the rotation is block-
// diagonal. Every thread of the CTA calls it, and the values are in place when it returns.
inline __device__ void rotate_into_shared(const RotationArgs& r, int sibling, float* dst,
                                          int pad_shift, int first = 0, int count = -1) {
  if (count < 0) count = r.n;
  const float* channel_scale =
      r.channel_scale ? r.channel_scale + int64_t{sibling} * r.n + first : nullptr;
  const int8_t* signs = r.signs ? r.signs + first : nullptr;
  int staged_bits = 0;
  with_typed_activation(r.x, r.dtype, [&](auto* xt) {
    staged_bits = stage_activation(xt + first, count, 1, channel_scale, signs, r.norm, r.vec,
                                   dst, count, PaddedIndex{pad_shift},
                                   staging_bits(r.pow2, count));
  });
  __syncthreads();
  fwht_shared(dst, 1, count, r.pow2, count, pad_shift, staged_bits);
  if (r.order > 1) mix_shared(dst, 1, count, r.order, r.pow2, r.table, count, pad_shift);
}

// Whether a batch-1 GEMV may rotate the activation in each CTA (one launch), where it fits in
// shared memory. QAMW_GEMV_ROTATE_ONCE=1 rotates it once instead, in a kernel of its own that
// writes it to global memory, as larger batches do (two launches, no rotation repeated per
// CTA), so that benchmarks can time both designs side by side; read at each launch.
inline bool rotate_in_each_cta() {
  return !env_is("QAMW_GEMV_ROTATE_ONCE", "1");
}

// Whether the tensor-core GEMV serves this call (mma_wanted) on this device: sm_80 or later,
// and row scales over whole k-blocks of 128 pairs (one scale a row, or Hadamard blocks of 256
// values and more), or over 32 or 64 pairs (blocks of 64 and 128), from batch 2; at 8 bits
// from batch 1 where each CTA holds the rotated activation (n up to 16384).
bool qamw_use_mma(const QamwWeight& w, int64_t batch);

// The pairs a lane of the tensor-core GEMV decodes per row and k-block (mma.cuh's RUN).
constexpr int kQamwMmaRun = 32;

// The tensor-core GEMV of `batch` (<= 16) activation rows, rotated and formatted into B
// `fragments` (mma.cuh, RUN = kQamwMmaRun) for each of `rotations`: one per sibling, or one
// for all.
void qamw_gemv_mma(const QamwWeight& w, int rotations, int64_t batch, const uint2* fragments,
                   void* out, DType dtype, cudaStream_t stream);

// The tensor-core GEMV of one activation row, which each CTA rotates itself (`rot`): one
// launch. False, having launched nothing, where the rotated activation does not fit in shared
// memory beside the codebook (n over 16384).
bool qamw_gemv_mma_fused(const QamwWeight& w, const RotationArgs& rot, void* out, DType dtype,
                         cudaStream_t stream);

}  // namespace qamw::cuda
