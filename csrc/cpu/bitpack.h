// Decoding the packed bit streams of kernels.h on the CPU.
#pragma once
#include <cstdint>
#include <type_traits>

namespace qamw::cpu {

// Calls f(std::integral_constant<int, B>) for the runtime bit width bits = B in 1..16.
template <typename F>
void dispatch_bits(int bits, F&& f) {
  switch (bits) {
#define QAMW_BITS_CASE(B) case B: f(std::integral_constant<int, B>{}); break;
    QAMW_BITS_CASE(1) QAMW_BITS_CASE(2) QAMW_BITS_CASE(3) QAMW_BITS_CASE(4)
    QAMW_BITS_CASE(5) QAMW_BITS_CASE(6) QAMW_BITS_CASE(7) QAMW_BITS_CASE(8)
    QAMW_BITS_CASE(9) QAMW_BITS_CASE(10) QAMW_BITS_CASE(11) QAMW_BITS_CASE(12)
    QAMW_BITS_CASE(13) QAMW_BITS_CASE(14) QAMW_BITS_CASE(15) QAMW_BITS_CASE(16)
#undef QAMW_BITS_CASE
  }
}

inline uint32_t extract_code(const uint32_t* words, int64_t bit_offset, int bits) {
  const int64_t word = bit_offset >> 5;
  const int shift = static_cast<int>(bit_offset & 31);
  uint64_t v = words[word];
  if (shift + bits > 32) v |= static_cast<uint64_t>(words[word + 1]) << 32;
  return static_cast<uint32_t>((v >> shift) & ((1u << bits) - 1u));
}

// Decodes the first `count` codes of one packed row. 32 codes of BITS bits are exactly
// BITS words, so full chunks are unpacked with shifts known at compile time.
template <int BITS, typename Code>
inline void decode_row(const int32_t* packed, int64_t count, Code* codes) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(packed);
  const int64_t chunks = count / 32;
  for (int64_t c = 0; c < chunks; ++c) {
    const uint32_t* w = words + c * BITS;
    Code* out = codes + c * 32;
#pragma GCC unroll 32
    for (int k = 0; k < 32; ++k) {
      const int off = k * BITS, word = off >> 5, shift = off & 31;
      uint64_t v = w[word];
      if (shift + BITS > 32) v |= static_cast<uint64_t>(w[word + 1]) << 32;
      out[k] = static_cast<Code>((v >> shift) & ((1u << BITS) - 1u));
    }
  }
  for (int64_t k = chunks * 32; k < count; ++k)
    codes[k] = static_cast<Code>(extract_code(words, k * BITS, BITS));
}

}  // namespace qamw::cpu
