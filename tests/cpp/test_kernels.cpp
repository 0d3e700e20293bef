// C++ checks of every CPU kernel against naive implementations written here, at odd sizes
// and in every activation dtype: the Hadamard tables are Hadamard matrices, the Hadamard
// transform (blocks of 2^m and K * 2^m) against the O(n^2) dense matrix,
// both nearest-codeword searches against brute force, bit packing round trips, QAM-W and
// AAAC dequantize against their definitions and their GEMVs against the dense matrices.
// Buffers are exactly sized std::vectors, so the sanitizer build (QAMW_SANITIZE) catches
// any read or write past them.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "hadamard_tables.h"
#include "kernels.h"
#include "test_util.h"

static int popcount_parity(int64_t v) { return __builtin_popcountll(v) & 1; }

// Entry (a, c) of the tabulated H_K, read from its rows or from the rows of its transpose.
static int table_entry(int64_t order, bool transpose, int64_t a, int64_t c) {
  return (qamw::kHadamardMasks[qamw::hadamard_mask_offset(order, transpose) + a] >> c & 1) ? -1 : 1;
}

static void test_hadamard_tables() {
  for (const int K : qamw::kHadamardOrders) {
    int bad = 0;
    for (int64_t a = 0; a < K; ++a)
      for (int64_t c = 0; c < K; ++c) {
        int dot = 0;  // (H H^T)[a][c]
        for (int64_t e = 0; e < K; ++e) dot += table_entry(K, false, a, e) * table_entry(K, false, c, e);
        bad += dot != (a == c ? K : 0);
        bad += table_entry(K, true, a, c) != table_entry(K, false, c, a);
      }
    for (int64_t a = 0; a < K; ++a)   // no bits past column K - 1
      bad += (qamw::kHadamardMasks[qamw::hadamard_mask_offset(K, false) + a] >> K) != 0;
    EXPECT(bad == 0, "H_%d is not a Hadamard matrix with its transpose: %d bad entries", K, bad);
    const qamw::HadamardSplit split = qamw::split_hadamard_block(K * 16);
    EXPECT(split.order == K && split.pow2 == 16, "split of %d * 16", K);
  }
  EXPECT(qamw::split_hadamard_block(1024).order == 1, "split of 1024");
  EXPECT(qamw::split_hadamard_block(12).pow2 == 1, "split of 12");
  for (const int64_t bad : {0, 1, 3, 6, 52, 100, 104})
    EXPECT(qamw::split_hadamard_block(bad).order == 0, "%lld is not a block", (long long)bad);
  EXPECT(qamw::hadamard_mask_offset(40, false) == -1, "no table of order 40");
}

// Entry (i, j) of the unnormalised H_K (x) H_{2^m} of a block (K = 1: the Sylvester matrix,
// (-1)^popcount(i & j)).
static double block_entry(int64_t block, int64_t i, int64_t j) {
  const qamw::HadamardSplit split = qamw::split_hadamard_block(block);
  const int64_t P = split.pow2;
  const double sylvester = popcount_parity((i % P) & (j % P)) ? -1.0 : 1.0;
  return split.order == 1 ? sylvester : sylvester * table_entry(split.order, false, i / P, j / P);
}

static void test_hadamard() {
  for (int64_t block : {2, 4, 8, 16, 64, 256, 12, 24, 80, 56, 576, 480, 44, 1536}) {
    const int64_t rows = 3, n = block * 3;
    std::vector<float> x(rows * n), out(rows * n);
    std::vector<int8_t> signs(n);
    for (auto& v : x) v = normal();
    for (auto& s : signs) s = (rng() & 1) ? 1 : -1;
    for (const bool inverse : {false, true}) {
      qamw::cpu::hadamard(x.data(), out.data(), qamw::DType::F32, rows, n, block, signs.data(),
                          inverse);
      double worst = 0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < n; b += block)
          for (int64_t i = 0; i < block; ++i) {
            double acc = 0;  // forward: H (signs x); inverse: signs (H^T x)
            for (int64_t j = 0; j < block; ++j)
              acc += inverse ? block_entry(block, j, i) * x[r * n + b + j]
                             : block_entry(block, i, j) * signs[b + j] * x[r * n + b + j];
            if (inverse) acc *= signs[b + i];
            worst = std::max(worst, std::abs(acc / std::sqrt(double(block)) - out[r * n + b + i]));
          }
      EXPECT(worst < 1e-5, "hadamard block %lld inverse %d: max error %g", (long long)block,
             int(inverse), worst);
    }
  }
}

static void test_nearest_2d() {
  for (int64_t K : {5, 256, 2048}) {
    std::vector<float> codebook(2 * K), points(2 * 50000);
    for (auto& v : codebook) v = normal();
    for (auto& v : points) v = 1.5f * normal();
    std::vector<int32_t> idx(50000);
    qamw::cpu::nearest_codeword_2d(points.data(), 50000, codebook.data(), K, idx.data());
    int wrong = 0;
    for (int64_t i = 0; i < 50000; ++i) {
      float best = INFINITY;
      for (int64_t k = 0; k < K; ++k) {
        const float dx = points[2 * i] - codebook[2 * k], dy = points[2 * i + 1] - codebook[2 * k + 1];
        best = std::min(best, dx * dx + dy * dy);
      }
      const float dx = points[2 * i] - codebook[2 * idx[i]], dy = points[2 * i + 1] - codebook[2 * idx[i] + 1];
      if (dx * dx + dy * dy > best * (1 + 1e-6f)) ++wrong;
    }
    EXPECT(wrong == 0, "nearest_codeword_2d K=%lld: %d points not nearest", (long long)K, wrong);
  }
}

static void test_pack_round_trip() {
  for (int bits = 1; bits <= 16; ++bits) {
    const int64_t rows = 3, count = 77;
    std::vector<int32_t> codes(rows * count), back(rows * count);
    for (auto& c : codes) c = static_cast<int32_t>(rng() & ((1u << bits) - 1));
    std::vector<int32_t> packed(rows * qamw::packed_words_per_row(count, bits));
    qamw::cpu::pack_bits(codes.data(), rows, count, bits, packed.data());
    qamw::cpu::unpack_bits(packed.data(), rows, count, bits, back.data());
    EXPECT(codes == back, "pack/unpack round trip at %d bits", bits);
  }
}

static void test_hadamard_dtypes_and_inverse() {
  for (const int64_t block : {32, 96}) {
    const int64_t rows = 5, n = 3 * block;
    std::vector<int8_t> signs(n);
    for (auto& s : signs) s = (rng() & 1) ? 1 : -1;
    for (const qamw::DType d : kDtypes) {
      Activations x(d, rows * n), y(d, rows * n), back(d, rows * n);
      for (int64_t i = 0; i < rows * n; ++i) x.set(i, normal());
      qamw::cpu::hadamard(x.data(), y.data(), d, rows, n, block, signs.data(), false);
      qamw::cpu::hadamard(y.data(), back.data(), d, rows, n, block, signs.data(), true);
      double worst = 0;
      for (int64_t i = 0; i < rows * n; ++i)
        worst = std::max(worst, double(std::abs(back.get(i) - x.get(i))));
      EXPECT(worst < 4 * tolerance(d), "hadamard block %lld round trip dtype %d: error %g",
             (long long)block, int(d), worst);
    }
  }
}

static int32_t brute_force_1d(float v, const std::vector<float>& codebook) {
  int32_t best = 0;
  float best_d = INFINITY;
  for (size_t k = 0; k < codebook.size(); ++k) {
    const float d = std::abs(v - codebook[k]);
    if (d < best_d) { best_d = d; best = static_cast<int32_t>(k); }
  }
  return best;
}

static void test_nearest_1d() {
  for (int64_t K : {1, 7, 37, 300}) {
    std::vector<float> codebook(K);
    for (auto& v : codebook) v = normal();
    if (K > 3) codebook[3] = codebook[1];  // a duplicate level: the lower index wins
    const int64_t count = 1001;
    std::vector<float> values(count);
    for (auto& v : values) v = 2 * normal();
    for (int64_t k = 0; k < K && k < 20; ++k) values[k] = codebook[k];
    values[20] = NAN;
    values[21] = INFINITY;
    values[22] = -INFINITY;
    std::vector<int32_t> idx(count);
    qamw::cpu::nearest_codeword_1d(values.data(), count, codebook.data(), K, idx.data());
    int wrong = 0;
    for (int64_t i = 0; i < count; ++i) {
      const bool finite = std::isfinite(values[i]);
      // Every distance to a non-finite value is inf or NaN: the spec's answer is index 0.
      const float want = finite ? std::abs(values[i] - codebook[brute_force_1d(values[i], codebook)]) : 0;
      const float got = finite ? std::abs(values[i] - codebook[idx[i]]) : float(idx[i]);
      if (got != want || (i < 20 && i < K && idx[i] != brute_force_1d(values[i], codebook))) ++wrong;
    }
    EXPECT(wrong == 0, "nearest_codeword_1d K=%lld: %d values not nearest", (long long)K, wrong);
  }
}

static void test_nearest_2d_edges() {
  // K = 1, the brute-force path (few points), and points outside the grid or not finite.
  for (int64_t K : {1, 64}) {
    std::vector<float> codebook(2 * K);
    for (auto& v : codebook) v = normal();
    for (int64_t count : {3, 1001}) {
      std::vector<float> points(2 * count);
      for (auto& v : points) v = 40 * normal();
      points[0] = NAN;
      points[3] = INFINITY;
      std::vector<int32_t> idx(count);
      qamw::cpu::nearest_codeword_2d(points.data(), count, codebook.data(), K, idx.data());
      int wrong = 0;
      for (int64_t i = 0; i < count; ++i) {
        int32_t best = 0;
        float best_d = INFINITY;
        for (int64_t k = 0; k < K; ++k) {
          const float dx = points[2 * i] - codebook[2 * k], dy = points[2 * i + 1] - codebook[2 * k + 1];
          if (dx * dx + dy * dy < best_d) { best_d = dx * dx + dy * dy; best = static_cast<int32_t>(k); }
        }
        if (idx[i] != best) ++wrong;
      }
      EXPECT(wrong == 0, "nearest_codeword_2d K=%lld count=%lld: %d wrong", (long long)K,
             (long long)count, wrong);
    }
  }
}

static void test_pack_odd_counts() {
  for (int bits = 1; bits <= 16; ++bits)
    for (int64_t count : {1, 31, 33, 129}) {
      const int64_t rows = 2, words = qamw::packed_words_per_row(count, bits);
      std::vector<int32_t> codes(rows * count), back(rows * count), packed(rows * words);
      for (auto& c : codes) c = static_cast<int32_t>(rng() & ((1u << bits) - 1));
      codes[0] = (1 << bits) - 1;
      qamw::cpu::pack_bits(codes.data(), rows, count, bits, packed.data());
      qamw::cpu::unpack_bits(packed.data(), rows, count, bits, back.data());
      EXPECT(codes == back, "pack/unpack %lld codes at %d bits", (long long)count, bits);
    }
}

// Relative error of y (batch, m) against x (batch, n) times the dense weight (m, n)^T.
static double gemv_error(const Activations& x, const std::vector<double>& dense, const Activations& y,
                         int64_t batch, int64_t m, int64_t n) {
  double worst = 0;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < m; ++i) {
      double acc = 0, mag = 0;
      for (int64_t j = 0; j < n; ++j) {
        acc += dense[i * n + j] * x.get(b * n + j);
        mag += std::abs(dense[i * n + j] * x.get(b * n + j));
      }
      worst = std::max(worst, std::abs(acc - y.get(b * m + i)) / (1e-6 + std::abs(acc) + 1e-3 * mag));
    }
  return worst;
}

// Largest error of a dequantized weight relative to the largest weight.
static double dense_error(const Activations& deq, const std::vector<double>& dense) {
  double worst = 0, top = 1e-30;
  for (size_t i = 0; i < dense.size(); ++i) {
    worst = std::max(worst, std::abs(deq.get(i) - dense[i]));
    top = std::max(top, std::abs(dense[i]));
  }
  return worst / top;
}

struct QamwCase { int bits; int64_t m, n, block; bool per_block; int64_t batch; };

static void test_qamw() {
  const QamwCase cases[] = {{4, 1, 2, 2, false, 1},   {7, 13, 96, 32, true, 3},
                            {11, 19, 192, 64, false, 2}, {12, 5, 66, 2, true, 17},
                            {8, 3, 1024, 1024, true, 1}, {8, 37, 576, 576, false, 1},
                            {7, 9, 576, 576, true, 16},  {5, 6, 48, 12, true, 3},
                            {9, 4, 160, 80, false, 2},   {6, 3, 1536, 1536, true, 5},
                            // batch 1 at 10-12 bits: tiles of 16 and 8 codes (lut_tile), a
                            // last one partial, and per-block scales over 16 pairs
                            {11, 21, 200, 8, false, 1},  {10, 7, 96, 32, true, 1},
                            {12, 5, 160, 32, true, 1},   {11, 3, 1536, 1536, false, 1}};
  for (const QamwCase& c : cases) {
    const int64_t K = int64_t{1} << c.bits, pairs = c.n / 2, blocks = c.n / c.block;
    const int64_t scales_per_row = c.per_block ? blocks : 1;
    std::vector<int32_t> codes(c.m * pairs);
    for (auto& v : codes) v = static_cast<int32_t>(rng() % K);
    const int64_t words = qamw::packed_words_per_row(pairs, c.bits);
    std::vector<int32_t> packed(c.m * words);
    qamw::cpu::pack_bits(codes.data(), c.m, pairs, c.bits, packed.data());
    std::vector<float> codebook(2 * K), row_scale(c.m * scales_per_row), channel(c.n);
    std::vector<int8_t> signs(c.n);
    for (auto& v : codebook) v = normal();
    for (auto& v : row_scale) v = 0.5f + std::abs(normal());
    for (auto& v : channel) v = 0.5f + std::abs(normal());
    for (auto& s : signs) s = (rng() & 1) ? 1 : -1;
    const qamw::QamwWeight w{packed.data(), words, codebook.data(), c.bits, row_scale.data(),
                             scales_per_row, channel.data(), signs.data(), c.block, c.m, c.n};
    // The definition: rotated row times the block Hadamard matrix, signs, 1 / channel scale.
    std::vector<double> dense(c.m * c.n);
    for (int64_t i = 0; i < c.m; ++i)
      for (int64_t j = 0; j < c.n; ++j) {
        const int64_t b0 = j / c.block * c.block;
        double acc = 0;
        for (int64_t k = b0; k < b0 + c.block; ++k) {
          const double scale = row_scale[i * scales_per_row + k / (c.n / scales_per_row)];
          const double r = scale * codebook[2 * codes[i * pairs + k / 2] + k % 2];
          acc += block_entry(c.block, k - b0, j - b0) * r;
        }
        dense[i * c.n + j] = acc / std::sqrt(double(c.block)) * signs[j] / channel[j];
      }
    for (const qamw::DType d : kDtypes) {
      Activations deq(d, c.m * c.n), x(d, c.batch * c.n), y(d, c.batch * c.m);
      qamw::cpu::qamw_dequantize(w, deq.data(), d);
      const double worst = dense_error(deq, dense);
      EXPECT(worst < tolerance(d), "qamw_dequantize bits=%d n=%lld dtype %d: error %g", c.bits,
             (long long)c.n, int(d), worst);
      for (int64_t i = 0; i < c.batch * c.n; ++i) x.set(i, normal());
      qamw::cpu::qamw_gemv(w, x.data(), d, c.batch, y.data());
      const double err = gemv_error(x, dense, y, c.batch, c.m, c.n);
      EXPECT(err < tolerance(d), "qamw_gemv bits=%d n=%lld batch=%lld dtype %d: error %g", c.bits,
             (long long)c.n, (long long)c.batch, int(d), err);
    }
  }
}

struct AaacCase { int64_t group, m, n; qamw::ScaleType scale_type; int64_t batch; bool scaled; };

static void test_aaac() {
  const AaacCase cases[] = {{16, 3, 16, qamw::ScaleType::F8E4M3, 1, false},
                            {32, 7, 96, qamw::ScaleType::F16, 3, true},
                            {128, 5, 256, qamw::ScaleType::F16, 17, false},
                            {256, 2, 512, qamw::ScaleType::F8E4M3, 2, true},
                            {16, 9, 48, qamw::ScaleType::F8E4M3, 16, true}};
  for (const AaacCase& c : cases) {
    const int64_t groups = c.n / c.group, words = qamw::packed_words_per_row(c.n, 4);
    std::vector<int32_t> codes(c.m * c.n), packed(c.m * words);
    for (auto& v : codes) v = static_cast<int32_t>(rng() & 15);
    qamw::cpu::pack_bits(codes.data(), c.m, c.n, 4, packed.data());
    std::vector<float> codebooks(32), channel(c.n), magnitude(c.m * groups);
    std::vector<int> choice(c.m * groups);
    for (auto& v : codebooks) v = normal();
    for (auto& v : channel) v = 0.5f + std::abs(normal());
    const float tensor_scale = 0.3f;
    const AaacScales scales(c.m * groups);
    for (int64_t g = 0; g < c.m * groups; ++g) {
      const float stored = scales.stored(c.scale_type, g);
      magnitude[g] = std::abs(stored);
      choice[g] = std::signbit(stored) ? 1 : 0;
    }
    const qamw::AaacWeight w{packed.data(), words, scales.data(c.scale_type), c.scale_type,
                             codebooks.data(),
                             c.scaled ? &tensor_scale : nullptr, c.scaled ? channel.data() : nullptr,
                             c.group, c.m, c.n};
    std::vector<double> dense(c.m * c.n);
    for (int64_t i = 0; i < c.m; ++i)
      for (int64_t j = 0; j < c.n; ++j) {
        const int64_t g = i * groups + j / c.group;
        double v = double(magnitude[g]) * codebooks[16 * choice[g] + codes[i * c.n + j]];
        if (c.scaled) v = v * tensor_scale / channel[j];
        dense[i * c.n + j] = v;
      }
    for (const qamw::DType d : kDtypes) {
      Activations deq(d, c.m * c.n), x(d, c.batch * c.n), y(d, c.batch * c.m);
      qamw::cpu::aaac_dequantize(w, deq.data(), d);
      const double worst = dense_error(deq, dense);
      EXPECT(worst < tolerance(d), "aaac_dequantize group=%lld dtype %d: error %g",
             (long long)c.group, int(d), worst);
      for (int64_t i = 0; i < c.batch * c.n; ++i) x.set(i, normal());
      qamw::cpu::aaac_gemv(w, x.data(), d, c.batch, y.data());
      const double err = gemv_error(x, dense, y, c.batch, c.m, c.n);
      EXPECT(err < tolerance(d), "aaac_gemv group=%lld batch=%lld dtype %d: error %g",
             (long long)c.group, (long long)c.batch, int(d), err);
    }
  }
}

int main() {
  test_hadamard_tables();
  test_hadamard();
  test_hadamard_dtypes_and_inverse();
  test_nearest_2d();
  test_nearest_2d_edges();
  test_nearest_1d();
  test_pack_round_trip();
  test_pack_odd_counts();
  test_qamw();
  test_aaac();
  std::printf(failures ? "%d checks failed\n" : "all kernel checks passed\n", failures);
  return failures ? 1 : 0;
}
