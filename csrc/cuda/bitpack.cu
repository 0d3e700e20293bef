// Bit packing of 1..16-bit codes on the GPU, in the layout of kernels.h (one LSB-first bit
// stream per row, rows padded with zero bits to whole 16-byte vectors). Pack gives each output
// word to one thread, which gathers the codes overlapping it, so the padding words get their
// zeros and no atomics are needed; unpack gives each code to one thread.
#include "common.cuh"

namespace qamw::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    pack_kernel(const int32_t* __restrict__ codes, int64_t rows, int64_t count, int bits,
                int64_t words, int32_t* __restrict__ packed) {
  const int64_t total = rows * words;
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t e = blockIdx.x * int64_t{kThreads} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * kThreads) {
    const int64_t row = e / words, w = e - row * words;
    const int64_t bit0 = 32 * w;
    const int64_t first = bit0 / bits;                               // first code touching w
    const int64_t last = (bit0 + 31) / bits < count ? (bit0 + 31) / bits : count - 1;
    const int32_t* c = codes + row * count;
    uint32_t word = 0;
    for (int64_t k = first; k <= last; ++k) {
      const uint64_t v = static_cast<uint32_t>(c[k]) & mask;
      const int64_t off = k * bits - bit0;                             // in (-bits, 32)
      word |= static_cast<uint32_t>(off >= 0 ? v << off : v >> -off);
    }
    packed[e] = static_cast<int32_t>(word);
  }
}

__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const int32_t* __restrict__ packed, int64_t rows, int64_t count, int bits,
                  int64_t words, int32_t* __restrict__ codes) {
  const int64_t total = rows * count;
  for (int64_t e = blockIdx.x * int64_t{kThreads} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * kThreads) {
    const int64_t row = e / count, k = e - row * count;
    const uint32_t* p = reinterpret_cast<const uint32_t*>(packed) + row * words;
    codes[e] = static_cast<int32_t>(packed_code(p, k, bits));
  }
}

unsigned grid_for(int64_t total) { return capped_grid(ceil_div(total, kThreads)); }

}  // namespace

void pack_bits(const int32_t* codes, int64_t rows, int64_t count, int bits, int32_t* packed,
               void* stream) {
  const int64_t words = packed_words_per_row(count, bits);
  if (rows == 0 || words == 0) return;
  pack_kernel<<<grid_for(rows * words), kThreads, 0, as_stream(stream)>>>(codes, rows, count,
                                                                           bits, words, packed);
}

void unpack_bits(const int32_t* packed, int64_t rows, int64_t count, int bits, int32_t* codes,
                 void* stream) {
  if (rows == 0 || count == 0) return;
  const int64_t words = packed_words_per_row(count, bits);
  unpack_kernel<<<grid_for(rows * count), kThreads, 0, as_stream(stream)>>>(packed, rows, count,
                                                                             bits, words, codes);
}

}  // namespace qamw::cuda
