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

// Code k of a chunk of 32 codes of BITS bits held in BITS consecutive words. In the
// unrolled loops below k is a constant, so are the word index and shift.
template <int BITS>
inline uint32_t chunk_code(const uint32_t* w, int k) {
  const int off = k * BITS, word = off >> 5, shift = off & 31;
  uint64_t v = w[word];
  if (shift + BITS > 32) v |= static_cast<uint64_t>(w[word + 1]) << 32;
  return static_cast<uint32_t>((v >> shift) & ((1u << BITS) - 1u));
}

template <int BITS, typename Code>
inline void decode_chunk32(const uint32_t* w, Code* out) {
#pragma GCC unroll 32
  for (int k = 0; k < 32; ++k) out[k] = static_cast<Code>(chunk_code<BITS>(w, k));
}

// sum over codes [FIRST, FIRST + LEN) of a chunk of table[(k - FIRST) * stride + code_k]:
// decoding fused with the lookup of the GEMVs' table path (see common.h).
template <int BITS, int LEN, int FIRST>
inline float lut_sum_codes(const float* table, int64_t stride, const uint32_t* w) {
  float s[4] = {};   // independent chains hide add latency
#pragma GCC unroll 32
  for (int k = 0; k < LEN; ++k) s[k & 3] += table[k * stride + chunk_code<BITS>(w, FIRST + k)];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Decodes codes [first, first + count) of one packed row. When `first` is a multiple of
// 32, every full chunk of 32 codes is exactly BITS aligned words.
template <int BITS, typename Code>
inline void decode_codes(const int32_t* packed, int64_t first, int64_t count, Code* codes) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(packed);
  int64_t k = 0;
  if (first % 32 == 0)
    for (; k + 32 <= count; k += 32) decode_chunk32<BITS>(words + (first + k) / 32 * BITS, codes + k);
  for (; k < count; ++k) codes[k] = static_cast<Code>(extract_code(words, (first + k) * BITS, BITS));
}

// Decodes the first `count` codes of one packed row.
template <int BITS, typename Code>
inline void decode_row(const int32_t* packed, int64_t count, Code* codes) {
  decode_codes<BITS>(packed, 0, count, codes);
}

}  // namespace qamw::cpu
