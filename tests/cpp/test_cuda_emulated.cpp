// Every CUDA launcher (csrc/cuda, run by the CPU emulation in cuda_emulator/) against the CPU
// kernel of the same op on the same random inputs: Hadamard blocks of 2^m (2 ... 2^15, one to
// three shared-memory passes) and K * 2^m, nearest codewords, bit packing, QAM-W and AAAC GEMV
// (fused and workspace activation paths, batches 1 ... 16, per-block scales; the CUDA-core and
// the tensor-core kernels at every batch, through QAMW_GEMV_MMA) and dequantize,
// in every activation dtype, at odd sizes and with unaligned pointers. Outputs are NaN until
// written. The whole run is repeated with each step's threads scheduled in reverse order, so
// that a result depending on a missing barrier differs between the two runs, and again on a
// second device with 99 KiB of shared memory per block instead of an H100's 227 KiB. The
// launchers must ask the runtime about a kernel only once a device and launch shape.
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <cstdio>
#include <vector>

#include "kernels.h"
#include "test_util.h"
// Last: the emulated runtime's macros stay out of the headers above.
#include "cuda_runtime.h"

namespace {

// Largest |a - b| over the outputs, relative to |b| + the outputs' RMS; NaN anywhere is inf.
double compare(const Activations& a, const Activations& b, int64_t size) {
  double rms = 0;
  for (int64_t i = 0; i < size; ++i) rms += double(b.get(i)) * b.get(i);
  rms = std::sqrt(rms / (size > 0 ? size : 1));
  double worst = 0;
  for (int64_t i = 0; i < size; ++i) {
    const double d = std::abs(double(a.get(i)) - b.get(i)) / (std::abs(b.get(i)) + rms + 1e-30);
    if (!(d <= worst)) worst = std::isnan(d) ? INFINITY : d;
  }
  return worst;
}

int64_t element_size(qamw::DType d) { return d == qamw::DType::F32 ? 4 : 2; }

void poison(Activations& a, int64_t size) {
  for (int64_t i = 0; i < size; ++i) a.set(i, NAN);
}

// A GEMV's CUDA launcher and its CPU kernel on the same random activation of `batch` rows
// (starting `off` elements into its buffer): the largest relative difference of their outputs.
template <typename Cuda, typename Cpu>
double gemv_difference(qamw::DType d, int64_t batch, int64_t m, int64_t n, int64_t off,
                       Cuda cuda, Cpu cpu) {
  Activations x(d, batch * n + off), got(d, batch * m), want(d, batch * m);
  for (int64_t i = 0; i < batch * n + off; ++i) x.set(i, normal());
  const void* xp = static_cast<const char*>(x.data()) + off * element_size(d);
  poison(got, batch * m);
  cuda(xp, got.data());
  cpu(xp, want.data());
  return compare(got, want, batch * m);
}

// The same for a dequantize of `size` values.
template <typename Cuda, typename Cpu>
double dequantize_difference(qamw::DType d, int64_t size, Cuda cuda, Cpu cpu) {
  Activations got(d, size), want(d, size);
  poison(got, size);
  cuda(got.data());
  cpu(want.data());
  return compare(got, want, size);
}

std::vector<int8_t> random_signs(int64_t n) {
  std::vector<int8_t> s(n);
  for (auto& v : s) v = (rng() & 1) ? 1 : -1;
  return s;
}

void test_hadamard() {
  struct Case { int64_t block, rows, n; };
  const Case cases[] = {{2, 3, 6},       {8, 5, 24},      {32, 3, 96},     {64, 7, 192},
                        {256, 3, 512},   {2048, 2, 4096}, {32768, 1, 32768}, {12, 4, 36},
                        {24, 3, 72},     {96, 3, 192},    {576, 2, 1152},  {480, 2, 480},
                        {1536, 1, 3072}, {44, 3, 88},
                        // Blocks of 2^6 - 2^9 share a CTA, which stores them together: CTAs
                        // whose last blocks are missing, and (3 rows) unaligned fp32 rows.
                        {128, 5, 384},   {128, 3, 256},   {512, 9, 1024},
                        // Staged 16-bit blocks: CTAs striding over several blocks, and (3 rows,
                        // unaligned) the unstaged kernel.
                        {16384, 7, 16384}, {16384, 3, 16384}, {32768, 4, 65536}};
  for (const Case& c : cases)
    for (const qamw::DType d : kDtypes)
      for (const bool with_signs : {false, true})
        for (const bool inverse : {false, true}) {
          // One element in: the unaligned (scalar) load path, and for 16-bit 2^14 blocks the
          // unstaged kernel.
          const int64_t off = (d == qamw::DType::F32 || c.block >= 16384) && c.rows == 3 ? 1 : 0;
          const int64_t size = c.rows * c.n;
          Activations x(d, size + off), got(d, size + off), want(d, size + off);
          for (int64_t i = 0; i < size + off; ++i) x.set(i, normal());
          poison(got, size + off);
          poison(want, size + off);
          const std::vector<int8_t> signs = random_signs(c.n);
          const int8_t* sg = with_signs ? signs.data() : nullptr;
          auto at = [&](Activations& a) { return static_cast<char*>(a.data()) + off * element_size(d); };
          qamw::cuda::hadamard(at(x), at(got), d, c.rows, c.n, c.block, sg, inverse, nullptr);
          qamw::cpu::hadamard(at(x), at(want), d, c.rows, c.n, c.block, sg, inverse);
          // Compare from `off` on: the element before stays NaN in both.
          Activations g(d, size), w(d, size);
          for (int64_t i = 0; i < size; ++i) {
            g.set(i, got.get(off + i));
            w.set(i, want.get(off + i));
          }
          const double err = compare(g, w, size);
          EXPECT(err < tolerance(d), "hadamard block %lld n %lld dtype %d signs %d inverse %d: error %g",
                 (long long)c.block, (long long)c.n, int(d), int(with_signs), int(inverse), err);
        }
}

void test_nearest() {
  for (const int64_t K : {1, 5, 256, 5000})
    for (const int64_t count : {3, 1001, 2500}) {
      std::vector<float> codebook(2 * K), points(2 * count);
      for (auto& v : codebook) v = normal();
      for (auto& v : points) v = 1.5f * normal();
      points[0] = NAN;
      if (count > 2) points[5] = INFINITY;
      std::vector<int32_t> got(count, -1), want(count, -2);
      qamw::cuda::nearest_codeword_2d(points.data(), count, codebook.data(), K, got.data(), nullptr);
      qamw::cpu::nearest_codeword_2d(points.data(), count, codebook.data(), K, want.data());
      EXPECT(got == want, "nearest_codeword_2d K=%lld count=%lld", (long long)K, (long long)count);

      std::vector<float> levels(K), values(count);
      for (auto& v : levels) v = normal();
      for (auto& v : values) v = 2 * normal();
      values[0] = NAN;
      std::vector<int32_t> got1(count, -1), want1(count, -2);
      qamw::cuda::nearest_codeword_1d(values.data(), count, levels.data(), K, got1.data(), nullptr);
      qamw::cpu::nearest_codeword_1d(values.data(), count, levels.data(), K, want1.data());
      EXPECT(got1 == want1, "nearest_codeword_1d K=%lld count=%lld", (long long)K, (long long)count);
    }
}

void test_pack() {
  for (int bits = 1; bits <= 16; ++bits)
    for (const int64_t count : {1, 33, 129, 1000}) {
      const int64_t rows = 3, words = qamw::packed_words_per_row(count, bits);
      std::vector<int32_t> codes(rows * count);
      for (auto& c : codes) c = static_cast<int32_t>(rng() & ((1u << bits) - 1));
      std::vector<int32_t> got(rows * words, -1), want(rows * words, -2);
      qamw::cuda::pack_bits(codes.data(), rows, count, bits, got.data(), nullptr);
      qamw::cpu::pack_bits(codes.data(), rows, count, bits, want.data());
      EXPECT(got == want, "pack_bits %lld codes at %d bits", (long long)count, bits);
      std::vector<int32_t> back(rows * count, -1);
      qamw::cuda::unpack_bits(want.data(), rows, count, bits, back.data(), nullptr);
      EXPECT(back == codes, "unpack_bits %lld codes at %d bits", (long long)count, bits);
    }
}

// Launches in clusters of 2 or more CTAs so far.
int64_t cluster_launches() {
  int64_t count = 0;
  for (unsigned blocks = 2; blocks <= 8; ++blocks) count += qamw_emu::cluster_launches(blocks);
  return count;
}

// Calls f(setting) with each GEMV kernel family forced (QAMW_GEMV_MMA=0: CUDA cores, =1:
// tensor cores where the weight allows), so that both run at every batch; the default takes
// one of the two (mma_wanted). With `batch_one` (QAM-W at batch 1), where tensor cores ran in
// clusters of CTAs that split the k-blocks, they run again with each CTA alone
// (QAMW_GEMV_CLUSTER=0); and both families run again with the activation rotated once by a
// kernel of its own (QAMW_GEMV_ROTATE_ONCE=1).
template <typename F>
void for_each_gemv_family(bool batch_one, F&& f) {
  int64_t before = 0;
  for (const char* setting : {"0", "1"}) {
    setenv("QAMW_GEMV_MMA", setting, 1);
    before = cluster_launches();
    f(setting);
  }
  if (batch_one && cluster_launches() > before) {
    setenv("QAMW_GEMV_CLUSTER", "0", 1);
    f("1, QAMW_GEMV_CLUSTER=0");
    unsetenv("QAMW_GEMV_CLUSTER");
  }
  if (batch_one) {
    setenv("QAMW_GEMV_ROTATE_ONCE", "1", 1);
    for (const char* setting : {"0", "1"}) {
      setenv("QAMW_GEMV_MMA", setting, 1);
      f(std::strcmp(setting, "0") == 0 ? "0, QAMW_GEMV_ROTATE_ONCE=1"
                                       : "1, QAMW_GEMV_ROTATE_ONCE=1");
    }
    unsetenv("QAMW_GEMV_ROTATE_ONCE");
  }
  unsetenv("QAMW_GEMV_MMA");
}

struct QamwCase {
  int bits;
  int64_t m, n, block;
  bool per_block, scaled, unaligned;
  std::vector<int64_t> batches;
  std::vector<int64_t> siblings = {};  // a fused weight's row counts (kernels.h), or none
  bool bf16_codebook = false;  // codewords rounded to bf16, as new layers' are (codebooks.py)
};

// v rounded to the nearest bf16 value (ties to even), and to 0 below 2^-14, as new layers'
// codewords are (codebooks.py): fp16 holds them exactly too.
float bf16_rounded(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x7FFFu + (bits >> 16 & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &bits, 4);
  return std::abs(v) < 0x1p-14f ? 0.0f : v;
}

// The Siblings of a fused weight of these row counts (none: one plain layer of m rows).
qamw::Siblings siblings_of(const std::vector<int64_t>& rows, int64_t m) {
  qamw::Siblings s;
  s.end[0] = m;
  int64_t total = 0;
  for (size_t i = 0; i < rows.size(); ++i) s.end[i] = total += rows[i];
  if (!rows.empty()) s.count = static_cast<int>(rows.size());
  return s;
}

void test_qamw() {
  const int64_t clusters_of_4 = qamw_emu::cluster_launches(4);
  const int64_t clusters_of_2 = qamw_emu::cluster_launches(2);
  const QamwCase cases[] = {
      {4, 37, 256, 256, false, true, false, {1, 2, 3}},
      {5, 70, 1024, 128, true, true, false, {1, 4, 16}},
      {6, 3, 778, 2, false, false, false, {1, 5}},          // a partial chunk of 133 pairs
      {8, 33, 576, 576, false, true, false, {1, 3}, {}, true},  // 36 * 16
      {9, 20, 1536, 1536, false, true, true, {1, 2, 16}},   // 12 * 128, unaligned codes and x
      {7, 11, 1536, 96, false, true, false, {1}},           // 12 * 8
      {12, 45, 4096, 4096, false, true, false, {1, 5}, {}, true},  // batch 5: the workspace path
      {8, 40, 8192, 8192, false, true, false, {1, 2}, {}, true},  // 32 chunks: 2 a lane
      {11, 300, 512, 64, true, false, false, {1, 16}, {}, true},
      // Scales of blocks of 64 and 128 in the tensor-core kernel's A, and k-blocks past n.
      {8, 21, 320, 64, true, true, false, {2, 5}},
      {6, 17, 384, 128, true, false, false, {1, 9}},
      {10, 9, 480, 480, false, true, false, {2}, {}, true},  // 60 * 8
      {7, 260, 2048, 256, true, true, false, {1, 3}},       // 9 CTAs on 8 slots: grids stride
      // Blocks whose tile exceeds 99 KiB: the global-memory rotation on the small device.
      {8, 4, 28672, 28672, false, true, false, {1, 2}, {}, true},  // 28 * 1024
      {11, 3, 32768, 32768, false, true, false, {1}},
      {9, 3, 30720, 30720, false, true, false, {1}},        // 60 * 512: H_60 is not symmetric
      // Fused siblings, each with its own channel scale: CTAs split among them, rows of one
      // sibling sharing a lane pair or a CTA step with the next one's, the workspace path.
      {4, 97, 1024, 1024, false, true, false, {1, 2}, {64, 17, 16}},
      {8, 300, 576, 576, true, true, false, {1, 4}, {1, 298, 1}},
      {11, 520, 2048, 256, false, true, false, {1, 5}, {256, 8, 255, 1}, true},  // 4 siblings
      {6, 41, 8192, 8192, false, true, false, {1, 3}, {21, 20}},
      {9, 7, 28672, 28672, false, true, false, {1}, {3, 4}},  // rotated in global memory
      {7, 64, 512, 64, false, false, false, {1, 2}, {32, 32}},  // no channel scale
      {6, 41, 8192, 8192, false, false, false, {3}, {21, 20}},  // nor in the workspace
      // Batch 1 on tensor cores in clusters of 4 CTAs, each rotating its runs of whole blocks
      // (the 256 values of a k-block, or lcm(256, block)): 2304 values of 36 * 16 each; 6 runs
      // split 1, 2, 1, 2; 5 runs, the last k-block partial; a cluster's 128 rows past m.
      {8, 50, 9216, 576, false, true, false, {1}, {}, true},
      {8, 70, 1536, 256, true, true, false, {1}},
      {6, 3, 1088, 64, true, true, true, {1}},
      {4, 130, 1024, 32, false, false, false, {1}, {100, 30}, true},
  };
  for (const QamwCase& c : cases) {
    const int64_t K = int64_t{1} << c.bits, pairs = c.n / 2;
    // The launcher takes per-block scales only for blocks of 2^m (kernels.h).
    const int64_t scales_per_row = c.per_block ? c.n / c.block : 1;
    std::vector<int32_t> codes(c.m * pairs);
    for (auto& v : codes) v = static_cast<int32_t>(rng() % K);
    const int64_t words = qamw::packed_words_per_row(pairs, c.bits), off = c.unaligned ? 1 : 0;
    std::vector<int32_t> packed(c.m * words + off);
    qamw::cpu::pack_bits(codes.data(), c.m, pairs, c.bits, packed.data() + off);
    const qamw::Siblings siblings = siblings_of(c.siblings, c.m);
    std::vector<float> codebook(2 * K), row_scale(c.m * scales_per_row),
        channel(siblings.count * c.n);
    for (auto& v : codebook) v = c.bf16_codebook ? bf16_rounded(normal()) : normal();
    for (auto& v : row_scale) v = 0.5f + std::abs(normal());
    for (auto& v : channel) v = 0.5f + std::abs(normal());
    const std::vector<int8_t> signs = random_signs(c.n);
    const qamw::QamwWeight w{packed.data() + off, words, codebook.data(), c.bits,
                             row_scale.data(), scales_per_row,
                             c.scaled ? channel.data() : nullptr,
                             c.scaled ? signs.data() : nullptr, c.block, c.m, c.n, siblings};
    for (const qamw::DType d : kDtypes) {
      for (const int64_t batch : c.batches) {
        for_each_gemv_family(batch == 1, [&](const char* mma) {
          // `unaligned`: the activation starts one element in too (the scalar staging path).
          std::vector<float> workspace(qamw::cuda::qamw_gemv_workspace_floats(w, batch), NAN);
          const int64_t clusters_before = cluster_launches();
          const int64_t launches_before = qamw_emu::launches();
          const double err = gemv_difference(
              d, batch, c.m, c.n, off,
              [&](const void* x, void* y) {
                qamw::cuda::qamw_gemv(w, x, d, batch, y, workspace.data(), nullptr);
              },
              [&](const void* x, void* y) { qamw::cpu::qamw_gemv(w, x, d, batch, y); });
          EXPECT(err < tolerance(d), "qamw_gemv bits=%d m=%lld n=%lld block=%lld batch=%lld dtype %d siblings %d QAMW_GEMV_MMA=%s: error %g",
                 c.bits, (long long)c.m, (long long)c.n, (long long)c.block, (long long)batch,
                 int(d), siblings.count, mma, err);
          // Clusters only on tensor cores at batch 1, and not when switched off.
          const bool may_cluster = batch == 1 && std::strcmp(mma, "1") == 0;
          EXPECT(may_cluster || cluster_launches() == clusters_before,
                 "qamw_gemv bits=%d m=%lld n=%lld batch=%lld QAMW_GEMV_MMA=%s: clusters",
                 c.bits, (long long)c.m, (long long)c.n, (long long)batch, mma);
          // Rotated once: the rotation's launch, then the GEMV's.
          EXPECT(std::strstr(mma, "ROTATE_ONCE") == nullptr ||
                     qamw_emu::launches() >= launches_before + 2,
                 "qamw_gemv bits=%d m=%lld n=%lld QAMW_GEMV_MMA=%s: one launch", c.bits,
                 (long long)c.m, (long long)c.n, mma);
        });
      }
      const double err = dequantize_difference(
          d, c.m * c.n, [&](void* out) { qamw::cuda::qamw_dequantize(w, out, d, nullptr); },
          [&](void* out) { qamw::cpu::qamw_dequantize(w, out, d); });
      // A block whose fp32 tile exceeds the device's shared memory is rotated in global memory,
      // through the output: fp16/bf16 outputs are rounded after each of its 3 or 4 steps, and
      // the largest error of ~10^5 values reached 8.5 units in the last place (4 allowed
      // elsewhere) at 28672 values, 9 bits, fp16.
      const bool in_global = 4 * c.block > qamw_emu::device().shared_per_block_optin;
      EXPECT(err < (in_global ? 3 : 1) * tolerance(d),
             "qamw_dequantize bits=%d n=%lld block=%lld dtype %d: error %g",
             c.bits, (long long)c.n, (long long)c.block, int(d), err);
    }
  }
  // The launcher chose clusters of 4 and of 2 for some of the weights above.
  EXPECT(qamw_emu::cluster_launches(4) > clusters_of_4, "no QAM-W GEMV ran in clusters of 4");
  EXPECT(qamw_emu::cluster_launches(2) > clusters_of_2, "no QAM-W GEMV ran in clusters of 2");
}

struct AaacCase {
  int64_t group, m, n;
  qamw::ScaleType scale_type;
  bool scaled, unaligned;
  std::vector<int64_t> batches;
  std::vector<int64_t> siblings = {};
  bool bf16_codebooks = false;  // as new layers' (aaac.py)
};

void test_aaac() {
  const AaacCase cases[] = {
      {16, 13, 48, qamw::ScaleType::F8E4M3, false, false, {1, 2}},
      {32, 37, 96, qamw::ScaleType::F16, true, false, {1, 3, 16}},
      {64, 70, 1024, qamw::ScaleType::F16, true, true, {1, 5}},
      {128, 21, 8192, qamw::ScaleType::F8E4M3, true, false, {1, 4, 16}, {}, true},  // x global
      {128, 70, 1024, qamw::ScaleType::F16, true, true, {1, 3, 16}},  // tensor cores: groups
      {256, 45, 768, qamw::ScaleType::F16, false, false, {1, 5}, {}, true},  // 128 and more
      // Unscaled: bf16 activations read in place, unless (unaligned) one element in.
      {128, 50, 1024, qamw::ScaleType::F8E4M3, false, false, {2, 9, 16}, {}, true},
      {128, 33, 512, qamw::ScaleType::F16, false, true, {1, 3}},
      {128, 40, 1024, qamw::ScaleType::F16, false, false, {1, 7, 13}, {24, 16}, true},
      // Groups under 128 on tensor cores: the magnitude in A, bf16 read in place.
      {16, 29, 384, qamw::ScaleType::F8E4M3, false, false, {1, 2, 8}, {}, true},
      {64, 35, 256, qamw::ScaleType::F16, false, false, {3, 16}},
      {16, 300, 256, qamw::ScaleType::F8E4M3, true, false, {1, 9}},
      {32, 777, 512, qamw::ScaleType::F16, true, false, {1}},  // 25 CTAs on 8 slots: strides
      // Fused siblings with their own codebooks, tensor and channel scales.
      {64, 97, 1024, qamw::ScaleType::F16, true, false, {1, 3}, {64, 17, 16}},
      {16, 300, 256, qamw::ScaleType::F8E4M3, true, false, {1, 16}, {1, 296, 2, 1}},
      {128, 41, 8192, qamw::ScaleType::F8E4M3, true, false, {1, 4}, {21, 20}},  // x from global
      {128, 97, 1024, qamw::ScaleType::F16, true, false, {1, 3}, {64, 17, 16}},
      {32, 64, 96, qamw::ScaleType::F16, false, false, {1, 2}, {32, 32}},
  };
  for (const AaacCase& c : cases) {
    const int64_t groups = c.n / c.group, words = qamw::packed_words_per_row(c.n, 4);
    const int64_t off = c.unaligned ? 1 : 0;
    std::vector<int32_t> codes(c.m * c.n), packed(c.m * words + off);
    for (auto& v : codes) v = static_cast<int32_t>(rng() & 15);
    qamw::cpu::pack_bits(codes.data(), c.m, c.n, 4, packed.data() + off);
    const qamw::Siblings siblings = siblings_of(c.siblings, c.m);
    std::vector<float> codebooks(32 * siblings.count), channel(siblings.count * c.n),
        tensor_scale(siblings.count);
    for (auto& v : codebooks) v = c.bf16_codebooks ? bf16_rounded(normal()) : normal();
    for (auto& v : channel) v = 0.5f + std::abs(normal());
    for (auto& v : tensor_scale) v = 0.1f + std::abs(normal());
    const AaacScales scales(c.m * groups);
    const qamw::AaacWeight w{packed.data() + off, words, scales.data(c.scale_type), c.scale_type,
                             codebooks.data(),
                             c.scaled ? tensor_scale.data() : nullptr,
                             c.scaled ? channel.data() : nullptr, c.group, c.m, c.n, siblings};
    for (const qamw::DType d : kDtypes) {
      for (const int64_t batch : c.batches) {
        for_each_gemv_family(false, [&](const char* mma) {
          std::vector<float> workspace(qamw::cuda::aaac_gemv_workspace_floats(w, batch), NAN);
          const double err = gemv_difference(
              d, batch, c.m, c.n, off,
              [&](const void* x, void* y) {
                qamw::cuda::aaac_gemv(w, x, d, batch, y, workspace.data(), nullptr);
              },
              [&](const void* x, void* y) { qamw::cpu::aaac_gemv(w, x, d, batch, y); });
          EXPECT(err < tolerance(d), "aaac_gemv group=%lld m=%lld n=%lld batch=%lld dtype %d siblings %d QAMW_GEMV_MMA=%s: error %g",
                 (long long)c.group, (long long)c.m, (long long)c.n, (long long)batch, int(d),
                 siblings.count, mma, err);
        });
      }
      const double err = dequantize_difference(
          d, c.m * c.n, [&](void* out) { qamw::cuda::aaac_dequantize(w, out, d, nullptr); },
          [&](void* out) { qamw::cpu::aaac_dequantize(w, out, d); });
      EXPECT(err < tolerance(d), "aaac_dequantize group=%lld dtype %d: error %g",
             (long long)c.group, int(d), err);
    }
  }
}

// Each launcher asks the runtime about a kernel (its attributes, occupancy, shared memory limit)
// once a device and launch shape (common.cuh, remembered): the same call again asks nothing.
// QAM-W at batch 1 in clusters, at batch 3 on tensor cores and on CUDA cores, AAAC at batches 1
// and 4, and a staged Hadamard block of 2^14.
void test_launch_facts() {
  const auto asks_once = [](const char* what, const auto& call) {
    call();
    const int64_t before = qamw_emu::runtime_queries();
    call();
    EXPECT(qamw_emu::runtime_queries() == before, "%s asked the runtime %lld times more", what,
           (long long)(qamw_emu::runtime_queries() - before));
  };
  const qamw::DType d = qamw::DType::BF16;
  const int64_t m = 70, n = 1536, pairs = n / 2, words = qamw::packed_words_per_row(pairs, 8);
  std::vector<int32_t> codes(m * pairs), packed(m * words);
  for (auto& v : codes) v = static_cast<int32_t>(rng() & 255);
  qamw::cpu::pack_bits(codes.data(), m, pairs, 8, packed.data());
  std::vector<float> codebook(2 * 256), row_scale(m), channel(n);
  for (auto& v : codebook) v = normal();
  for (auto& v : row_scale) v = 0.5f + std::abs(normal());
  for (auto& v : channel) v = 0.5f + std::abs(normal());
  const std::vector<int8_t> signs = random_signs(n);
  const qamw::QamwWeight qamw_w{packed.data(), words, codebook.data(), 8, row_scale.data(), 1,
                                channel.data(), signs.data(), 256, m, n, siblings_of({}, m)};
  Activations x(d, 4 * n), y(d, 4 * m);
  for (int64_t i = 0; i < 4 * n; ++i) x.set(i, normal());
  for (const int64_t batch : {1, 3})
    for (const char* mma : {"1", "0"}) {
      setenv("QAMW_GEMV_MMA", mma, 1);
      std::vector<float> workspace(qamw::cuda::qamw_gemv_workspace_floats(qamw_w, batch));
      asks_once(batch == 1 ? "qamw_gemv, batch 1" : "qamw_gemv, batch 3", [&] {
        qamw::cuda::qamw_gemv(qamw_w, x.data(), d, batch, y.data(), workspace.data(), nullptr);
      });
    }
  unsetenv("QAMW_GEMV_MMA");

  const int64_t group = 128, aaac_words = qamw::packed_words_per_row(n, 4);
  std::vector<int32_t> nibbles(m * aaac_words);
  for (auto& v : nibbles) v = static_cast<int32_t>(rng());
  std::vector<float> codebooks(32);
  for (auto& v : codebooks) v = normal();
  const AaacScales scales(m * (n / group));
  const qamw::AaacWeight aaac_w{nibbles.data(), aaac_words, scales.data(qamw::ScaleType::F16),
                                qamw::ScaleType::F16, codebooks.data(), nullptr, nullptr,
                                group, m, n, siblings_of({}, m)};
  for (const int64_t batch : {1, 4}) {
    std::vector<float> workspace(qamw::cuda::aaac_gemv_workspace_floats(aaac_w, batch));
    asks_once("aaac_gemv", [&] {
      qamw::cuda::aaac_gemv(aaac_w, x.data(), d, batch, y.data(), workspace.data(), nullptr);
    });
  }

  Activations rows(d, 2 * 16384), rotated(d, 2 * 16384);
  for (int64_t i = 0; i < 2 * 16384; ++i) rows.set(i, normal());
  asks_once("hadamard of 2^14", [&] {
    qamw::cuda::hadamard(rows.data(), rotated.data(), d, 2, 16384, 16384, nullptr, false,
                         nullptr);
  });
}

}  // namespace

int main() {
  const std::pair<const char*, void (*)()> tests[] = {{"hadamard", test_hadamard},
                                                      {"nearest codeword", test_nearest},
                                                      {"bit packing", test_pack},
                                                      {"QAM-W", test_qamw},
                                                      {"AAAC", test_aaac},
                                                      {"launch facts", test_launch_facts}};
  // Device 0 has an H100's shared memory, device 1 99 KiB per block (sm_86 / sm_89 GPUs): a
  // second device in the same process, as the launchers remember what the runtime says of each.
  cudaSetDevice(1);
  qamw_emu::device().shared_per_block_optin = 99 * 1024;
  qamw_emu::device().shared_per_sm = 100 * 1024;
  struct Pass {
    const char* name;
    qamw_emu::Schedule schedule;
    int device;
  };
  const Pass passes[] = {{"forward", qamw_emu::Schedule::Forward, 0},
                         {"reverse", qamw_emu::Schedule::Reverse, 0},
                         {"99 KiB shared memory", qamw_emu::Schedule::Forward, 1}};
  for (const Pass& pass : passes) {
    qamw_emu::set_schedule(pass.schedule);
    cudaSetDevice(pass.device);
    for (const auto& [name, test] : tests) {
      const auto start = std::chrono::steady_clock::now();
      const int before = failures;
      test();
      std::printf("%s, %s: %d failed checks, %.1f s\n", name, pass.name, failures - before,
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      std::fflush(stdout);
    }
  }
  std::printf(failures ? "%d checks failed\n" : "all emulated CUDA kernel checks passed\n",
              failures);
  return failures ? 1 : 0;
}
