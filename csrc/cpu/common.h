// Shared pieces of the CPU kernels: activation dtypes and the block Hadamard transform.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "hadamard_tables.h"
#include "kernels.h"

namespace qamw::cpu {

// Calls f with a null pointer of the C++ type of `dtype` (float, c10::Half, c10::BFloat16).
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: f(static_cast<float*>(nullptr)); break;
    case DType::F16: f(static_cast<c10::Half*>(nullptr)); break;
    case DType::BF16: f(static_cast<c10::BFloat16*>(nullptr)); break;
  }
}

// In-place orthonormal Walsh-Hadamard transform of one block of `size` floats (Sylvester
// order). The stride-1, 2 and 4 stages are done together on groups of 8 so that every
// remaining stage is a loop over >= 8 contiguous pairs the compiler vectorises.
inline void fwht_block(float* v, int64_t size) {
  int64_t h = 1;
  if (size >= 8) {
    for (int64_t i = 0; i < size; i += 8) {
      float* a = v + i;
      float s0 = a[0] + a[1], d0 = a[0] - a[1], s1 = a[2] + a[3], d1 = a[2] - a[3];
      float s2 = a[4] + a[5], d2 = a[4] - a[5], s3 = a[6] + a[7], d3 = a[6] - a[7];
      float t0 = s0 + s1, t1 = d0 + d1, t2 = s0 - s1, t3 = d0 - d1;
      float u0 = s2 + s3, u1 = d2 + d3, u2 = s2 - s3, u3 = d2 - d3;
      a[0] = t0 + u0; a[1] = t1 + u1; a[2] = t2 + u2; a[3] = t3 + u3;
      a[4] = t0 - u0; a[5] = t1 - u1; a[6] = t2 - u2; a[7] = t3 - u3;
    }
    h = 8;
  }
  for (; h < size; h *= 2) {
    for (int64_t i = 0; i < size; i += 2 * h) {
      float* __restrict a = v + i;
      float* __restrict b = v + i + h;
      for (int64_t j = 0; j < h; ++j) {
        float x = a[j], y = b[j];
        a[j] = x + y;
        b[j] = x - y;
      }
    }
  }
  const float norm = 1.0f / std::sqrt(static_cast<float>(size));
  for (int64_t j = 0; j < size; ++j) v[j] *= norm;
}

// The orthonormal Hadamard transform of blocks of B = K * 2^m values (hadamard_tables.h):
// (H_K (x) H_{2^m}) / sqrt(B), or its transpose. A block is K runs of 2^m values; each run gets
// the Walsh-Hadamard transform, then (K > 1) every column b is mixed across the runs by
// H_K / sqrt(K) (H_K^T for the transpose). K = 1 is fwht_block alone.
class BlockHadamard {
 public:
  BlockHadamard(int64_t block, bool transpose) : block_(block) {
    const HadamardSplit split = split_hadamard_block(block);
    order_ = split.order;
    pow2_ = split.pow2;
    if (order_ == 1) return;
    const uint64_t* rows = kHadamardMasks + hadamard_mask_offset(order_, transpose);
    const float one = 1.0f / std::sqrt(static_cast<float>(order_));
    mix_.resize(order_ * order_);
    for (int64_t a = 0; a < order_; ++a)
      for (int64_t c = 0; c < order_; ++c) mix_[a * order_ + c] = (rows[a] >> c & 1) ? -one : one;
  }

  int64_t block() const { return block_; }
  int64_t order() const { return order_; }

  // Every block of a row of n values, in place; scratch holds block() floats (K > 1).
  // The K = 1 test is made once per row, so power-of-two blocks run fwht_block alone.
  void row(float* v, int64_t n, float* scratch) const {
    if (order_ == 1) {
      for (int64_t b = 0; b < n; b += block_) fwht_block(v + b, block_);
    } else {
      for (int64_t b = 0; b < n; b += block_) mixed_block(v + b, scratch);
    }
  }

  // One block when K > 1, in place; scratch holds block() floats.
  void mixed_block(float* v, float* scratch) const {
    if (pow2_ > 1)
      for (int64_t a = 0; a < order_; ++a) fwht_block(v + a * pow2_, pow2_);
    switch (pow2_) {
      case 1: mix<1>(v, scratch); break;
      case 2: mix<2>(v, scratch); break;
      case 4: mix<4>(v, scratch); break;
      case 8: mix<8>(v, scratch); break;
      default: mix<16>(v, scratch); break;
    }
    std::copy(scratch, scratch + block_, v);
  }

 private:
  // y = (H_K / sqrt(K) (x) I) v: output runs four at a time (every tabulated K is a multiple of
  // 4) and columns W at a time, the 4 x W sums in registers while the K input runs stream by.
  // Not inlined: inlined into mixed_block, GCC 12 compiled it slower for short runs (the
  // hadamard op at 480 = 60 * 8: 5.9 against 4.1 ns per value).
  template <int W>
  [[gnu::noinline]] void mix(const float* v, float* y) const {
    const int64_t K = order_, P = pow2_;
    for (int64_t a = 0; a < K; a += 4) {
      const float* h = mix_.data() + a * K;
      for (int64_t b = 0; b < P; b += W) {
        float acc[4][W] = {};
        for (int64_t c = 0; c < K; ++c) {
          const float* x = v + c * P + b;
          const float h0 = h[c], h1 = h[K + c], h2 = h[2 * K + c], h3 = h[3 * K + c];
#pragma omp simd
          for (int w = 0; w < W; ++w) {
            acc[0][w] += h0 * x[w];
            acc[1][w] += h1 * x[w];
            acc[2][w] += h2 * x[w];
            acc[3][w] += h3 * x[w];
          }
        }
        for (int r = 0; r < 4; ++r) std::copy(acc[r], acc[r] + W, y + (a + r) * P + b);
      }
    }
  }

  int64_t block_, order_, pow2_;
  std::vector<float> mix_;   // K x K: entry (a, c) is what output run a takes of input run c
};

// out[j] = H_block(signs * x / channel_scale) for one row of n values, in fp32;
// scratch: h.block() floats.
template <typename T>
void rotate_activation(const T* x, int64_t n, const BlockHadamard& h, const int8_t* signs,
                       const float* channel_scale, float* out, float* scratch) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(x[j]);
    if (channel_scale) v /= channel_scale[j];
    if (signs) v *= static_cast<float>(signs[j]);
    out[j] = v;
  }
  h.row(out, n, scratch);
}

// The GEMVs at batch 1 look up instead of multiplying: for a tile of codes, a
// table of every code's dot product with the activation values it multiplies, so that a
// weight row costs one load and one add per code. The loads are scalar on purpose:
// hardware gathers are slower than scalar loads on the CPUs measured (AMD Zen 4), and
// setup.py tells the compiler not to emit them.
//
// A tile holds lut_tile<BITS>() codes, its table that many times 2^BITS floats: 32 codes up to
// 9 bits, then as many as 64 KiB of table allow, at least 8. At 11 bits (5.5 bpw) tiles of 8
// codes took 1.19x less time than tiles of 32 (a 256 KiB table), tiles of 4 more (the row
// loop's overhead); NOTES, CPU GEMV v10.
template <int BITS>
constexpr int64_t lut_tile() {
  constexpr int64_t fit = (int64_t{64 * 1024} / int64_t{sizeof(float)}) >> BITS;
  return fit >= 32 ? 32 : fit >= 8 ? fit : 8;
}

// Calls f(std::integral_constant<int, part * TILE>{}): the first code, within its chunk of 32,
// of part `part` (< 32 / TILE) of the chunk, so that decoding it has compile-time shifts.
template <int64_t TILE, typename F, int... P>
void dispatch_chunk_part(int64_t part, F&& f, std::integer_sequence<int, P...>) {
  ((part == P ? f(std::integral_constant<int, P * TILE>{}) : void()), ...);
}
template <int64_t TILE, typename F>
void dispatch_chunk_part(int64_t part, F&& f) {
  dispatch_chunk_part<TILE>(part, f, std::make_integer_sequence<int, 32 / TILE>{});
}

// How far ahead the table path prefetches its rows. 16 rather than 8: with weights streamed
// from memory (benchmarks/NOTES.md, CPU GEMV v7) 3.5 bpw took 1.34x less time, 4 bpw 1.04x;
// 5.5 bpw and AAAC, slower per row, did not change.
constexpr int64_t kPrefetchRows = 16;

// sum over p < len of table[p * stride + index[p]].
template <typename Index>
inline float lut_sum(const float* table, int64_t stride, const Index* index, int64_t len) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;   // independent chains hide add latency
  int64_t p = 0;
  for (; p + 4 <= len; p += 4) {
    s0 += table[p * stride + index[p]];
    s1 += table[(p + 1) * stride + index[p + 1]];
    s2 += table[(p + 2) * stride + index[p + 2]];
    s3 += table[(p + 3) * stride + index[p + 3]];
  }
  // At most 3 left; the explicit bound also keeps GCC from assuming p * stride overflows.
  for (int i = 0; i < 3 && p + i < len; ++i) s0 += table[(p + i) * stride + index[p + i]];
  return (s0 + s1) + (s2 + s3);
}

// Larger batches decode kDenseRows weight rows to fp32 and multiply them with every
// activation row, kDenseChunk columns at a time so that the decoded rows stay in L1 and
// each activation load serves all of them.
constexpr int64_t kDenseRows = 8;
constexpr int64_t kDenseChunk = 512;

// out[b * out_stride + r] = scale * <rows[r], x[b]> for r < count (<= kDenseRows) and
// b < batch; rows has kDenseRows rows of n floats. acc: room for batch * kDenseRows floats.
template <typename T>
inline void multiply_rows(const float* rows, int64_t count, int64_t n, const float* x,
                          int64_t batch, float scale, float* acc, T* out, int64_t out_stride) {
  constexpr int kLanes = 16;
  std::fill(acc, acc + batch * kDenseRows, 0.f);
  for (int64_t c0 = 0; c0 < n; c0 += kDenseChunk) {
    const int64_t len = std::min(kDenseChunk, n - c0);
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * n + c0;
      float lanes[kDenseRows][kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= len; j += kLanes)
#pragma GCC unroll 8
        for (int r = 0; r < kDenseRows; ++r)
#pragma omp simd
          for (int v = 0; v < kLanes; ++v) lanes[r][v] += rows[r * n + c0 + j + v] * xb[j + v];
      for (int r = 0; r < kDenseRows; ++r) {
        float s = 0.f;
        for (int v = 0; v < kLanes; ++v) s += lanes[r][v];
        for (int64_t q = j; q < len; ++q) s += rows[r * n + c0 + q] * xb[q];
        acc[b * kDenseRows + r] += s;
      }
    }
  }
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < count; ++r)
      out[b * out_stride + r] = static_cast<T>(scale * acc[b * kDenseRows + r]);
}

// out[b * m + i] = scale * <weight row i, x[b]> for a whole weight: each thread decodes its
// rows kDenseRows at a time with its own decoder, make_decoder(), which returns a callable
// decode(i, row) writing weight row i as n floats.
template <typename T, typename MakeDecoder>
void multiply_decoded_rows(int64_t m, int64_t n, const float* x, int64_t batch, float scale,
                           T* out, MakeDecoder&& make_decoder) {
  at::parallel_for(0, (m + kDenseRows - 1) / kDenseRows, 1, [&](int64_t begin, int64_t end) {
    auto decode = make_decoder();
    std::vector<float> rows(kDenseRows * n, 0.f), acc(batch * kDenseRows);
    for (int64_t r0 = begin * kDenseRows; r0 < std::min(m, end * kDenseRows); r0 += kDenseRows) {
      const int64_t count = std::min(kDenseRows, m - r0);
      for (int64_t r = 0; r < count; ++r) decode(r0 + r, rows.data() + r * n);
      multiply_rows(rows.data(), count, n, x, batch, scale, acc.data(), out + r0, m);
    }
  });
}

}  // namespace qamw::cpu
