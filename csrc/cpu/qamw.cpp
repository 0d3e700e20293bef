// QAM-W fused GEMV and dequantize on the CPU. The activation is rotated once (n log n);
// each weight row is then decoded code by code and dotted with the rotated activation, so
// the weight is never expanded in memory.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/bitpack.h"
#include "cpu/common.h"

namespace qamw::cpu {

template <int BITS, typename T>
static void gemv_typed(const QamwWeight& w, const T* x, int64_t batch, T* out) {
  const int64_t n = w.n, pairs = n / 2;
  const int64_t segment_pairs = pairs / w.scales_per_row;  // pairs sharing one row scale
  std::vector<float> xr(batch * n);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      rotate_activation(x + b * n, n, w.block, w.signs, w.channel_scale, xr.data() + b * n);
  });
  const float* cb = w.codebook;
  at::parallel_for(0, w.m, 8, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> codes(pairs);
    std::vector<float> acc(batch), part(batch);
    for (int64_t i = begin; i < end; ++i) {
      decode_row<BITS>(w.packed + i * w.words_per_row, pairs, codes.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < w.scales_per_row; ++s) {
        const uint16_t* c = codes.data() + s * segment_pairs;
        const int64_t j0 = 2 * s * segment_pairs;
        if (batch == 1) {
          // Two accumulators hide the latency of the dependent adds.
          const float* xs = xr.data() + j0;
          float a0 = 0.f, a1 = 0.f;
          int64_t k = 0;
          for (; k + 1 < segment_pairs; k += 2) {
            const float* p = cb + 2 * c[k];
            const float* q = cb + 2 * c[k + 1];
            a0 += p[0] * xs[2 * k] + p[1] * xs[2 * k + 1];
            a1 += q[0] * xs[2 * k + 2] + q[1] * xs[2 * k + 3];
          }
          if (k < segment_pairs) a0 += cb[2 * c[k]] * xs[2 * k] + cb[2 * c[k] + 1] * xs[2 * k + 1];
          part[0] = a0 + a1;
        } else {
          std::fill(part.begin(), part.end(), 0.f);
          for (int64_t k = 0; k < segment_pairs; ++k) {
            const float c0 = cb[2 * c[k]], c1 = cb[2 * c[k] + 1];
            const float* xs = xr.data() + j0 + 2 * k;
            for (int64_t b = 0; b < batch; ++b) part[b] += c0 * xs[b * n] + c1 * xs[b * n + 1];
          }
        }
        const float scale = w.row_scale[i * w.scales_per_row + s];
        for (int64_t b = 0; b < batch; ++b) acc[b] += scale * part[b];
      }
      for (int64_t b = 0; b < batch; ++b) out[b * w.m + i] = static_cast<T>(acc[b]);
    }
  });
}

void qamw_gemv(const QamwWeight& w, const void* x, DType dtype, int64_t batch, void* out) {
  if (batch == 0 || w.m == 0) return;
  dispatch_bits(w.bits, [&](auto bits) {
    dispatch_dtype(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      gemv_typed<decltype(bits)::value>(w, static_cast<const T*>(x), batch, static_cast<T*>(out));
    });
  });
}

template <int BITS, typename T>
static void dequantize_typed(const QamwWeight& w, T* out) {
  const int64_t n = w.n, pairs = n / 2, segment = n / w.scales_per_row;
  at::parallel_for(0, w.m, 4, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> codes(pairs);
    std::vector<float> row(n);
    for (int64_t i = begin; i < end; ++i) {
      decode_row<BITS>(w.packed + i * w.words_per_row, pairs, codes.data());
      for (int64_t k = 0; k < pairs; ++k) {
        const float scale = w.row_scale[i * w.scales_per_row + (2 * k) / segment];
        row[2 * k] = scale * w.codebook[2 * codes[k]];
        row[2 * k + 1] = scale * w.codebook[2 * codes[k] + 1];
      }
      // W row = (rotated row) H diag(signs) / s: H is symmetric, so transform the row.
      for (int64_t b = 0; b < n; b += w.block) fwht_block(row.data() + b, w.block);
      T* o = out + i * n;
      for (int64_t j = 0; j < n; ++j) {
        float v = row[j];
        if (w.signs) v *= static_cast<float>(w.signs[j]);
        if (w.channel_scale) v /= w.channel_scale[j];
        o[j] = static_cast<T>(v);
      }
    }
  });
}

void qamw_dequantize(const QamwWeight& w, void* out, DType dtype) {
  if (w.m == 0) return;
  dispatch_bits(w.bits, [&](auto bits) {
    dispatch_dtype(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      dequantize_typed<decltype(bits)::value>(w, static_cast<T*>(out));
    });
  });
}

}  // namespace qamw::cpu
