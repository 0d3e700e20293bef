// C++ checks of the CPU kernels against naive implementations written here: the Hadamard
// transform against the O(n^2) Sylvester matrix, the grid nearest-codeword search against
// brute force, bit packing round trips, and the QAM-W GEMV against its dequantized matrix.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels.h"

static int failures = 0;
#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);      \
      std::printf(__VA_ARGS__);                             \
      std::printf("\n");                                    \
      ++failures;                                           \
    }                                                       \
  } while (0)

static std::mt19937 rng(7);
static float normal() { return std::normal_distribution<float>(0.f, 1.f)(rng); }

static int popcount_parity(int64_t v) { return __builtin_popcountll(v) & 1; }

static void test_hadamard() {
  for (int64_t block : {2, 4, 8, 16, 64, 256}) {
    const int64_t rows = 3, n = block * 3;
    std::vector<float> x(rows * n), out(rows * n);
    std::vector<int8_t> signs(n);
    for (auto& v : x) v = normal();
    for (auto& s : signs) s = (rng() & 1) ? 1 : -1;
    qamw::cpu::hadamard(x.data(), out.data(), qamw::DType::F32, rows, n, block, signs.data(), false);
    double worst = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < n; b += block)
        for (int64_t i = 0; i < block; ++i) {
          double acc = 0;  // Sylvester entry H[i][j] = (-1)^popcount(i & j)
          for (int64_t j = 0; j < block; ++j)
            acc += (popcount_parity(i & j) ? -1.0 : 1.0) * signs[b + j] * x[r * n + b + j];
          worst = std::max(worst, std::abs(acc / std::sqrt(double(block)) - out[r * n + b + i]));
        }
    EXPECT(worst < 1e-5, "hadamard block %lld: max error %g", (long long)block, worst);
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

static void test_qamw_gemv_matches_dequantize() {
  const int bits = 11;
  const int64_t m = 19, n = 192, block = 64, K = 1 << bits;
  std::vector<int32_t> codes(m * n / 2);
  for (auto& c : codes) c = static_cast<int32_t>(rng() % K);
  std::vector<int32_t> packed(m * qamw::packed_words_per_row(n / 2, bits));
  qamw::cpu::pack_bits(codes.data(), m, n / 2, bits, packed.data());
  std::vector<float> codebook(2 * K), row_scale(m), channel(n), x(2 * n), dense(m * n), y(2 * m);
  std::vector<int8_t> signs(n);
  for (auto& v : codebook) v = normal();
  for (auto& v : row_scale) v = 0.5f + std::abs(normal());
  for (auto& v : channel) v = 0.5f + std::abs(normal());
  for (auto& v : x) v = normal();
  for (auto& s : signs) s = (rng() & 1) ? 1 : -1;
  qamw::QamwWeight w{packed.data(), qamw::packed_words_per_row(n / 2, bits), codebook.data(), bits,
                     row_scale.data(), 1, channel.data(), signs.data(), block, m, n};
  qamw::cpu::qamw_dequantize(w, dense.data(), qamw::DType::F32);
  qamw::cpu::qamw_gemv(w, x.data(), qamw::DType::F32, 2, y.data());
  double worst = 0;
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t i = 0; i < m; ++i) {
      double acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += double(dense[i * n + j]) * x[b * n + j];
      worst = std::max(worst, std::abs(acc - y[b * m + i]) / (1 + std::abs(acc)));
    }
  EXPECT(worst < 1e-4, "qamw_gemv vs dequantize: relative error %g", worst);
}

int main() {
  test_hadamard();
  test_nearest_2d();
  test_pack_round_trip();
  test_qamw_gemv_matches_dequantize();
  std::printf(failures ? "%d checks failed\n" : "all kernel checks passed\n", failures);
  return failures ? 1 : 0;
}
