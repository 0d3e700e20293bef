// QAM-W fused GEMV and dequantize on the CPU. The activation is rotated once (n log n);
// each weight row is then decoded code by code and dotted with the rotated activation, so
// the weight is never expanded in memory.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/bitpack.h"
#include "cpu/common.h"

namespace qamw::cpu {

// Batch 1: the table path of common.h over codewords, lut_tile<BITS>() pairs at a time. Each
// thread builds its own table and streams the rows of its chunk through it.
template <int BITS, typename T>
static void gemv_lut(const QamwWeight& w, const float* xr, T* out) {
  constexpr int64_t K = int64_t{1} << BITS, kTile = lut_tile<BITS>();
  const int64_t pairs = w.n / 2, segment_pairs = pairs / w.scales_per_row;
  std::vector<float> cb0(K), cb1(K);   // split so the table loop is unit-stride
  for (int64_t c = 0; c < K; ++c) {
    cb0[c] = w.codebook[2 * c];
    cb1[c] = w.codebook[2 * c + 1];
  }
  at::parallel_for(0, w.m, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> table(kTile * K);
    std::vector<float> acc(end - begin, 0.f);
    uint16_t codes[kTile];
    for (int64_t k0 = 0; k0 < pairs; k0 += kTile) {
      const int64_t len = std::min(kTile, pairs - k0);
      for (int64_t p = 0; p < len; ++p) {
        const float x0 = xr[2 * (k0 + p)], x1 = xr[2 * (k0 + p) + 1];
        float* t = table.data() + p * K;
#pragma omp simd
        for (int64_t c = 0; c < K; ++c) t[c] = cb0[c] * x0 + cb1[c] * x1;
      }
      const int64_t segment = k0 / segment_pairs;   // a tile never straddles two
      // The rows through this tile. A whole tile is codes [first, first + kTile) of the chunk
      // of 32 codes (BITS words) that holds it, `first` a compile-time constant.
      auto rows = [&](auto first) {
        for (int64_t i = begin; i < end; ++i) {
          const int32_t* row = w.packed + i * w.words_per_row;
          const uint32_t* chunk = reinterpret_cast<const uint32_t*>(row) + k0 / 32 * BITS;
          // Rows are read a tile at a time, a stride the hardware prefetchers miss.
          __builtin_prefetch(chunk + kPrefetchRows * w.words_per_row);
          float s;
          if (len == kTile) {
            s = lut_sum_codes<BITS, kTile, decltype(first)::value>(table.data(), K, chunk);
          } else {
            decode_codes<BITS>(row, k0, len, codes);
            s = lut_sum(table.data(), K, codes, len);
          }
          acc[i - begin] += w.scales_per_row == 1 ? s : w.row_scale[i * w.scales_per_row + segment] * s;
        }
      };
      dispatch_chunk_part<kTile>(k0 % 32 / kTile, rows);
    }
    for (int64_t i = begin; i < end; ++i)
      out[i] = static_cast<T>(w.scales_per_row == 1 ? w.row_scale[i] * acc[i - begin] : acc[i - begin]);
  });
}

// Larger batches: decode kDenseRows rows into their scaled rotated-domain weights and
// multiply them with every activation row (common.h).
template <int BITS, typename T>
static void gemv_dense(const QamwWeight& w, const float* xr, int64_t batch, T* out) {
  const int64_t pairs = w.n / 2, segment_pairs = pairs / w.scales_per_row;
  multiply_decoded_rows(w.m, w.n, xr, batch, 1.f, out, [&] {
    return [&w, pairs, segment_pairs, codes = std::vector<uint16_t>(pairs)](int64_t i, float* row) mutable {
      decode_row<BITS>(w.packed + i * w.words_per_row, pairs, codes.data());
      for (int64_t s = 0; s < w.scales_per_row; ++s) {
        const float scale = w.row_scale[i * w.scales_per_row + s];
        for (int64_t k = s * segment_pairs; k < (s + 1) * segment_pairs; ++k) {
          row[2 * k] = scale * w.codebook[2 * codes[k]];
          row[2 * k + 1] = scale * w.codebook[2 * codes[k] + 1];
        }
      }
    };
  });
}

template <int BITS, typename T>
static void gemv_typed(const QamwWeight& w, const T* x, int64_t batch, T* out) {
  const int64_t n = w.n;
  std::vector<float> xr(batch * n);
  const BlockHadamard h(w.block, false);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(w.block);
    for (int64_t b = begin; b < end; ++b)
      rotate_activation(x + b * n, n, h, w.signs, w.channel_scale, xr.data() + b * n,
                        scratch.data());
  });
  const int64_t segment_pairs = n / 2 / w.scales_per_row;
  if (batch == 1 && (w.scales_per_row == 1 || segment_pairs % lut_tile<BITS>() == 0))
    gemv_lut<BITS>(w, xr.data(), out);
  else
    gemv_dense<BITS>(w, xr.data(), batch, out);
}

void qamw_gemv(const QamwWeight& w, const void* x, DType dtype, int64_t batch, void* out) {
  if (batch == 0 || w.m == 0) return;
  if (w.siblings.count > 1)
    return gemv_each_sibling(w, dtype, batch, out, [&](const QamwWeight& v, void* part) {
      qamw_gemv(v, x, dtype, batch, part);
    });
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
  // W row = (rotated row) H diag(signs) / s, and (row H)^T = H^T row^T.
  const BlockHadamard h(w.block, true);
  at::parallel_for(0, w.m, 4, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> codes(pairs);
    std::vector<float> row(n), scratch(w.block);
    for (int64_t i = begin; i < end; ++i) {
      decode_row<BITS>(w.packed + i * w.words_per_row, pairs, codes.data());
      for (int64_t k = 0; k < pairs; ++k) {
        const float scale = w.row_scale[i * w.scales_per_row + (2 * k) / segment];
        row[2 * k] = scale * w.codebook[2 * codes[k]];
        row[2 * k + 1] = scale * w.codebook[2 * codes[k] + 1];
      }
      h.row(row.data(), n, scratch.data());
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
  if (w.siblings.count > 1)
    return dequantize_each_sibling(w, dtype, out, [&](const QamwWeight& v, void* rows) {
      qamw_dequantize(v, rows, dtype);
    });
  dispatch_bits(w.bits, [&](auto bits) {
    dispatch_dtype(dtype, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      dequantize_typed<decltype(bits)::value>(w, static_cast<T*>(out));
    });
  });
}

}  // namespace qamw::cpu
