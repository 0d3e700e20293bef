// AAAC GEMV and dequantize on the CPU: 4-bit codes, one scale per group whose sign bit
// picks one of the layer's two 16-entry codebooks.
#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/bitpack.h"
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

template <typename T>
static void aaac_gemv_typed(const AaacWeight& w, const T* x, int64_t batch, T* out) {
  const int64_t n = w.n, groups = n / w.group;
  std::vector<float> xs(batch * n);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < n; ++j) {
      const float v = static_cast<float>(x[b * n + j]);
      xs[b * n + j] = w.channel_scale ? v / w.channel_scale[j] : v;
    }
  const float tensor_scale = w.tensor_scale ? *w.tensor_scale : 1.0f;
  e4m3_magnitudes();  // build the table before the threads race to it
  at::parallel_for(0, w.m, 8, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(n);
    std::vector<float> acc(batch);
    for (int64_t i = begin; i < end; ++i) {
      decode_row<4>(w.packed + i * w.words_per_row, n, codes.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < groups; ++g) {
        const GroupScale s = group_scale(w, i * groups + g);
        const float* table = w.codebooks + 16 * s.choice;
        const uint8_t* c = codes.data() + g * w.group;
        for (int64_t b = 0; b < batch; ++b) {
          const float* xg = xs.data() + b * n + g * w.group;
          float a0 = 0.f, a1 = 0.f;
          for (int64_t k = 0; k < w.group; k += 2) {
            a0 += table[c[k]] * xg[k];
            a1 += table[c[k + 1]] * xg[k + 1];
          }
          acc[b] += s.magnitude * (a0 + a1);
        }
      }
      for (int64_t b = 0; b < batch; ++b) out[b * w.m + i] = static_cast<T>(tensor_scale * acc[b]);
    }
  });
}

void aaac_gemv(const AaacWeight& w, const void* x, DType dtype, int64_t batch, void* out) {
  if (batch == 0 || w.m == 0) return;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    aaac_gemv_typed(w, static_cast<const T*>(x), batch, static_cast<T*>(out));
  });
}

template <typename T>
static void aaac_dequantize_typed(const AaacWeight& w, T* out) {
  const int64_t n = w.n, groups = n / w.group;
  const float tensor_scale = w.tensor_scale ? *w.tensor_scale : 1.0f;
  e4m3_magnitudes();
  at::parallel_for(0, w.m, 8, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(n);
    for (int64_t i = begin; i < end; ++i) {
      decode_row<4>(w.packed + i * w.words_per_row, n, codes.data());
      for (int64_t g = 0; g < groups; ++g) {
        const GroupScale s = group_scale(w, i * groups + g);
        const float* table = w.codebooks + 16 * s.choice;
        for (int64_t k = 0; k < w.group; ++k) {
          const int64_t j = g * w.group + k;
          float v = tensor_scale * s.magnitude * table[codes[j]];
          if (w.channel_scale) v /= w.channel_scale[j];
          out[i * n + j] = static_cast<T>(v);
        }
      }
    }
  });
}

void aaac_dequantize(const AaacWeight& w, void* out, DType dtype) {
  if (w.m == 0) return;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    aaac_dequantize_typed(w, static_cast<T*>(out));
  });
}

}  // namespace qamw::cpu
