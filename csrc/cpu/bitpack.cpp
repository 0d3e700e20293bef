// Bit packing of 1..16-bit codes on the CPU (layout in kernels.h).
#include <ATen/Parallel.h>

#include <cstring>

#include "cpu/bitpack.h"
#include "kernels.h"

namespace qamw::cpu {

void pack_bits(const int32_t* codes, int64_t rows, int64_t count, int bits, int32_t* packed) {
  const int64_t words = packed_words_per_row(count, bits);
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, count)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint32_t* out = reinterpret_cast<uint32_t*>(packed + r * words);
      std::memset(out, 0, words * sizeof(uint32_t));
      const int32_t* in = codes + r * count;
      for (int64_t k = 0; k < count; ++k) {
        const uint64_t v = static_cast<uint32_t>(in[k]);
        const int64_t off = k * bits, word = off >> 5;
        const int shift = static_cast<int>(off & 31);
        out[word] |= static_cast<uint32_t>(v << shift);
        if (shift + bits > 32) out[word + 1] |= static_cast<uint32_t>(v >> (32 - shift));
      }
    }
  });
}

void unpack_bits(const int32_t* packed, int64_t rows, int64_t count, int bits, int32_t* codes) {
  const int64_t words = packed_words_per_row(count, bits);
  dispatch_bits(bits, [&](auto b) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, count)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        decode_row<decltype(b)::value>(packed + r * words, count, codes + r * count);
    });
  });
}

}  // namespace qamw::cpu
