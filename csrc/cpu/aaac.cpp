// AAAC GEMV and dequantize on the CPU: 4-bit codes, one scale per group whose sign bit
// picks one of the layer's two 16-entry codebooks.
#include <ATen/Parallel.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/common.h"

namespace qamw::cpu {
namespace {

// Magnitudes of the 128 non-negative FP8 E4M3 (fn) bit patterns.
const std::array<float, 128>& e4m3_magnitudes() {
  static const std::array<float, 128> table = [] {
    std::array<float, 128> t{};
    for (int v = 0; v < 128; ++v) {
      const int e = v >> 3, m = v & 7;
      if (e == 15 && m == 7) t[v] = std::numeric_limits<float>::quiet_NaN();
      else if (e == 0) t[v] = std::ldexp(m / 8.0f, -6);
      else t[v] = std::ldexp(1.0f + m / 8.0f, e - 7);
    }
    return t;
  }();
  return table;
}

// |scale| and the codebook choice (its sign bit) of group g of row i.
struct GroupScale { float magnitude; int choice; };

inline GroupScale group_scale(const AaacWeight& w, int64_t index) {
  if (w.scale_type == ScaleType::F16) {
    const uint16_t bits = static_cast<const uint16_t*>(w.scales)[index];
    const float v = static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
    return {std::abs(v), bits >> 15};
  }
  const uint8_t bits = static_cast<const uint8_t*>(w.scales)[index];
  return {e4m3_magnitudes()[bits & 0x7F], bits >> 7};
}

}  // namespace

// Batch 1 without AVX-512 (gemv_avx512 below is 2x faster where it runs): the table path of
// common.h over bytes, each byte two 4-bit codes (low nibble first). For a tile of kTileBytes
// bytes, every byte value's dot product with the two activation values it multiplies, under
// each of the two codebooks; a row then costs one load and one add per byte, plus one scale
// per group.
template <int64_t kGroupBytes, typename T>
static void gemv_lut(const AaacWeight& w, const float* xs, float tensor_scale, T* out) {
  constexpr int64_t kTileBytes = 64, kValues = 256;   // 128 KB of tables, in L2
  // Groups and the row length are multiples of 8 bytes, both powers of two: a tile holds
  // whole groups or lies inside one, and every segment below has this compile-time length.
  constexpr int64_t kSegment = std::min(kGroupBytes, kTileBytes);
  const int64_t groups = w.n / w.group, row_bytes = w.n / 2;
  float low[2][kValues], high[2][kValues];   // byte -> codebook value of each nibble
  for (int choice = 0; choice < 2; ++choice)
    for (int v = 0; v < kValues; ++v) {
      low[choice][v] = w.codebooks[16 * choice + (v & 15)];
      high[choice][v] = w.codebooks[16 * choice + (v >> 4)];
    }
  at::parallel_for(0, w.m, 16, [&](int64_t begin, int64_t end) {
    // table[(choice * kTileBytes + q) * kValues + byte]
    std::vector<float> table(2 * kTileBytes * kValues);
    std::vector<float> acc(end - begin, 0.f);
    for (int64_t q0 = 0; q0 < row_bytes; q0 += kTileBytes) {
      const int64_t len = std::min(kTileBytes, row_bytes - q0);
      for (int choice = 0; choice < 2; ++choice)
        for (int64_t q = 0; q < len; ++q) {
          const float x0 = xs[2 * (q0 + q)], x1 = xs[2 * (q0 + q) + 1];
          float* t = table.data() + (choice * kTileBytes + q) * kValues;
#pragma omp simd
          for (int v = 0; v < kValues; ++v) t[v] = low[choice][v] * x0 + high[choice][v] * x1;
        }
      for (int64_t i = begin; i < end; ++i) {
        const uint8_t* bytes = reinterpret_cast<const uint8_t*>(w.packed + i * w.words_per_row) + q0;
        // Rows are read a tile at a time, a stride the hardware prefetchers miss.
        __builtin_prefetch(bytes + kPrefetchRows * w.words_per_row * 4);
        float a = 0.f;
        for (int64_t q = 0; q < len; q += kSegment) {
          const GroupScale s = group_scale(w, i * groups + (q0 + q) / kGroupBytes);
          a += s.magnitude * lut_sum(table.data() + (s.choice * kTileBytes + q) * kValues,
                                     kValues, bytes + q, kSegment);
        }
        acc[i - begin] += a;
      }
    }
    for (int64_t i = begin; i < end; ++i) out[i] = static_cast<T>(tensor_scale * acc[i - begin]);
  });
}

#ifdef __AVX512F__
// The 16 codes of 8 bytes (low nibble first) as permute indices.
inline __m512i nibble_index(const uint8_t* bytes) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
}
#endif

// Row i's weights times `factor`: out[k] = factor * |scale| * codebook[code k], a group at a
// time. With AVX-512 a group's 16-entry table is one register and 16 codes take one permute;
// the scalar loop is the portable build's.
static void decode_row_scaled(const AaacWeight& w, int64_t i, float factor, float* out) {
  const int64_t groups = w.n / w.group;
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(w.packed + i * w.words_per_row);
  for (int64_t g = 0; g < groups; ++g, bytes += w.group / 2, out += w.group) {
    const GroupScale s = group_scale(w, i * groups + g);
    float table[16];
    for (int c = 0; c < 16; ++c) table[c] = factor * s.magnitude * w.codebooks[16 * s.choice + c];
#ifdef __AVX512F__
    const __m512 entries = _mm512_loadu_ps(table);
    for (int64_t k = 0; k < w.group; k += 16)
      _mm512_storeu_ps(out + k, _mm512_permutexvar_ps(nibble_index(bytes + k / 2), entries));
#else
    for (int64_t k = 0; k < w.group; k += 2) {
      out[k] = table[bytes[k / 2] & 15];
      out[k + 1] = table[bytes[k / 2] >> 4];
    }
#endif
  }
}

// Larger batches: decode kDenseRows rows into their scaled weights and multiply them with
// every activation row (common.h). A group decodes through its codebook times its scale.
template <typename T>
static void gemv_dense(const AaacWeight& w, const float* xs, int64_t batch, float tensor_scale,
                       T* out) {
  multiply_decoded_rows(w.m, w.n, xs, batch, tensor_scale, out, [&] {
    return [&w](int64_t i, float* row) { decode_row_scaled(w, i, 1.0f, row); };
  });
}

#ifdef __AVX512F__
// Batch 1 with AVX-512: a group's codebook times its scale is one register, so 16 codes decode
// with one permute and meet their activations in one FMA, the weight never leaving registers.
// R rows at a time share each activation load and give R independent FMA chains.
template <int R>
static void dot_rows(const AaacWeight& w, const float* xs, int64_t first, float* sums) {
  const int64_t groups = w.n / w.group;
  const __m512 books[2] = {_mm512_loadu_ps(w.codebooks), _mm512_loadu_ps(w.codebooks + 16)};
  const uint8_t* bytes[R];
  __m512 acc[R];
  for (int r = 0; r < R; ++r) {
    bytes[r] = reinterpret_cast<const uint8_t*>(w.packed + (first + r) * w.words_per_row);
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512 entries[R];
    for (int r = 0; r < R; ++r) {
      const GroupScale s = group_scale(w, (first + r) * groups + g);
      entries[r] = _mm512_mul_ps(_mm512_set1_ps(s.magnitude), books[s.choice]);
    }
    for (int64_t k = g * w.group; k < (g + 1) * w.group; k += 16) {
      const __m512 x = _mm512_loadu_ps(xs + k);
      for (int r = 0; r < R; ++r) {
        const __m512 weights = _mm512_permutexvar_ps(nibble_index(bytes[r] + k / 2), entries[r]);
        acc[r] = _mm512_fmadd_ps(weights, x, acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

template <typename T>
static void gemv_avx512(const AaacWeight& w, const float* xs, float tensor_scale, T* out) {
  constexpr int kRows = 4;
  at::parallel_for(0, w.m, 16, [&](int64_t begin, int64_t end) {
    float sums[kRows];
    int64_t i = begin;
    for (; i + kRows <= end; i += kRows) {
      dot_rows<kRows>(w, xs, i, sums);
      for (int r = 0; r < kRows; ++r) out[i + r] = static_cast<T>(tensor_scale * sums[r]);
    }
    for (; i < end; ++i) {
      dot_rows<1>(w, xs, i, sums);
      out[i] = static_cast<T>(tensor_scale * sums[0]);
    }
  });
}
#endif

template <typename T>
static void aaac_gemv_typed(const AaacWeight& w, const T* x, int64_t batch, T* out) {
  const int64_t n = w.n;
  std::vector<float> xs(batch * n);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < n; ++j) {
      const float v = static_cast<float>(x[b * n + j]);
      xs[b * n + j] = w.channel_scale ? v / w.channel_scale[j] : v;
    }
  const float tensor_scale = w.tensor_scale ? *w.tensor_scale : 1.0f;
  e4m3_magnitudes();  // build the table before the threads race to it
  if (batch > 1) return gemv_dense(w, xs.data(), batch, tensor_scale, out);
#ifdef __AVX512F__
  return gemv_avx512(w, xs.data(), tensor_scale, out);
#endif
  switch (w.group) {   // 16 ... 256, checked by the wrapper
    case 16: return gemv_lut<8>(w, xs.data(), tensor_scale, out);
    case 32: return gemv_lut<16>(w, xs.data(), tensor_scale, out);
    case 64: return gemv_lut<32>(w, xs.data(), tensor_scale, out);
    case 128: return gemv_lut<64>(w, xs.data(), tensor_scale, out);
    default: return gemv_lut<128>(w, xs.data(), tensor_scale, out);
  }
}

void aaac_gemv(const AaacWeight& w, const void* x, DType dtype, int64_t batch, void* out) {
  if (batch == 0 || w.m == 0) return;
  if (w.siblings.count > 1)
    return gemv_each_sibling(w, dtype, batch, out, [&](const AaacWeight& v, void* part) {
      aaac_gemv(v, x, dtype, batch, part);
    });
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    aaac_gemv_typed(w, static_cast<const T*>(x), batch, static_cast<T*>(out));
  });
}

template <typename T>
static void aaac_dequantize_typed(const AaacWeight& w, T* out) {
  const int64_t n = w.n;
  const float tensor_scale = w.tensor_scale ? *w.tensor_scale : 1.0f;
  e4m3_magnitudes();
  at::parallel_for(0, w.m, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t i = begin; i < end; ++i) {
      decode_row_scaled(w, i, tensor_scale, row.data());
      for (int64_t j = 0; j < n; ++j) {
        float v = row[j];
        if (w.channel_scale) v /= w.channel_scale[j];
        out[i * n + j] = static_cast<T>(v);
      }
    }
  });
}

void aaac_dequantize(const AaacWeight& w, void* out, DType dtype) {
  if (w.m == 0) return;
  if (w.siblings.count > 1)
    return dequantize_each_sibling(w, dtype, out, [&](const AaacWeight& v, void* rows) {
      aaac_dequantize(v, rows, dtype);
    });
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    aaac_dequantize_typed(w, static_cast<T*>(out));
  });
}

}  // namespace qamw::cpu
