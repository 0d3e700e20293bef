// Block Hadamard transform on the CPU (blocks of 2^m and K * 2^m, common.h): parallel over
// blocks.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/common.h"

namespace qamw::cpu {

template <typename T>
static void hadamard_typed(const T* x, T* out, int64_t rows, int64_t n, int64_t block,
                           const int8_t* signs, bool inverse) {
  const int64_t blocks_per_row = n / block;
  const int64_t total = rows * blocks_per_row;
  const int64_t grain = std::max<int64_t>(1, 16384 / block);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(block);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t offset = (t / blocks_per_row) * n + (t % blocks_per_row) * block;
      const int8_t* s = signs ? signs + (t % blocks_per_row) * block : nullptr;
      for (int64_t j = 0; j < block; ++j) {
        float v = static_cast<float>(x[offset + j]);
        buf[j] = (s && !inverse) ? v * s[j] : v;
      }
      fwht_block(buf.data(), block);
      for (int64_t j = 0; j < block; ++j)
        out[offset + j] = static_cast<T>((s && inverse) ? buf[j] * s[j] : buf[j]);
    }
  });
}

// The same for blocks of K * 2^m, K > 1. A function of its own so that the power-of-two one
// above keeps exactly the code it had before.
template <typename T>
static void hadamard_mixed_typed(const T* x, T* out, int64_t rows, int64_t n,
                                 const BlockHadamard& h, const int8_t* signs, bool inverse) {
  const int64_t block = h.block(), blocks_per_row = n / block;
  const int64_t grain = std::max<int64_t>(1, 16384 / block);
  at::parallel_for(0, rows * blocks_per_row, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(block), scratch(block);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t offset = (t / blocks_per_row) * n + (t % blocks_per_row) * block;
      const int8_t* s = signs ? signs + (t % blocks_per_row) * block : nullptr;
      for (int64_t j = 0; j < block; ++j) {
        const float v = static_cast<float>(x[offset + j]);
        buf[j] = (s && !inverse) ? v * s[j] : v;
      }
      h.mixed_block(buf.data(), scratch.data());
      for (int64_t j = 0; j < block; ++j)
        out[offset + j] = static_cast<T>((s && inverse) ? buf[j] * s[j] : buf[j]);
    }
  });
}

void hadamard(const void* x, void* out, DType dtype, int64_t rows, int64_t n, int64_t block,
              const int8_t* signs, bool inverse) {
  // Forward H (signs * x), inverse signs * (H^T x).
  const BlockHadamard h(block, inverse);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (h.order() == 1)
      hadamard_typed(static_cast<const T*>(x), static_cast<T*>(out), rows, n, block, signs,
                     inverse);
    else
      hadamard_mixed_typed(static_cast<const T*>(x), static_cast<T*>(out), rows, n, h, signs,
                           inverse);
  });
}

}  // namespace qamw::cpu
