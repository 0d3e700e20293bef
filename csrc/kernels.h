// Launchers of every qamw_ext kernel, on raw pointers. Nothing here knows of torch:
// the CPU kernels live in csrc/cpu/, the CUDA ones in csrc/cuda/, and the torch
// wrappers that check arguments and call these live in csrc/*.cpp.
//
// Conventions shared by every kernel:
//  * matrices are row-major and contiguous;
//  * activations are fp32, fp16 or bf16 (DType); every sum is accumulated in fp32;
//  * `signs` is an int8 vector of +-1 of length n, or nullptr;
//  * `channel_scale` is an fp32 vector of length n (the activation is divided by it), or nullptr;
//    a fused weight (Siblings) has one per sibling: [siblings.count, n];
//  * a Hadamard `block` is a power of two or K * 2^m with K a tabulated order, and H is the
//    orthonormal (H_K (x) H_{2^m}) / sqrt(block) of hadamard_tables.h on each block: the
//    hadamard op computes H (signs * x), or signs * (H^T x) when `inverse`.
//
// Packed codes (pack_bits): each row of `count` codes of `bits` bits is one little-endian
// bit stream, code k occupying bits [k*bits, (k+1)*bits) counted from bit 0 of word 0
// (LSB first). A row holds words_per_row = 4 * ceil(count * bits / 128) int32 words, so
// every row starts 16-byte aligned and any 128 consecutive codes fill exactly `bits`
// 16-byte vectors: a GPU thread decodes them from `bits` aligned 16-byte loads. Padding
// bits are zero.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

namespace qamw {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };
enum class ScaleType : int { F16 = 0, F8E4M3 = 1 };

inline int64_t packed_words_per_row(int64_t count, int bits) {
  return 4 * ((count * bits + 127) / 128);
}

// Rows of up to kMaxSiblings layers that read one input (q/k/v; gate/up), fused into one weight
// so that one launch serves them all (qamw_ext/fusion.py). Sibling s owns rows
// [end[s - 1], end[s]) and its own per-layer parameters: its channel scale (row s of
// channel_scale) and for AAAC its codebooks and tensor scale. Each sibling's rows then compute
// exactly what its own layer would. count 1 is a plain layer.
constexpr int kMaxSiblings = 4;
struct Siblings {
  int count = 1;
  int64_t end[kMaxSiblings] = {};   // cumulative rows, end[count - 1] = m (read when count > 1)
  int64_t begin(int s) const { return s == 0 ? 0 : end[s - 1]; }
};

// QAM-W weight: code k of row i is codeword codebook[code] = (c0, c1), the weights of
// rotated columns 2k and 2k+1, times row_scale[i * scales_per_row + (2k) / (n / scales_per_row)].
// The dense weight is W = diag(row scale) * C * H * diag(signs) * diag(1 / channel_scale)
// with H the orthonormal block Hadamard matrix of block size `block` (hadamard_tables.h).
struct QamwWeight {
  const int32_t* packed;      // [m, words_per_row]
  int64_t words_per_row;
  const float* codebook;      // [2^bits, 2]
  int bits;                   // bits per pair, 4..12
  const float* row_scale;     // [m, scales_per_row]
  int64_t scales_per_row;     // 1, or n / block (one scale per Hadamard block)
  const float* channel_scale; // [siblings.count, n] or nullptr
  const int8_t* signs;        // [n] or nullptr
  int64_t block;              // Hadamard block size dividing n: 2^m or K * 2^m
  int64_t m, n;               // out_features, in_features
  Siblings siblings;
};

// AAAC weight: 4-bit codes; group g of row i has scale s = scales[i, g] whose sign bit
// selects codebooks[sign] (16 fp32 values each); w = tensor_scale * |s| * codebooks[sign][code].
struct AaacWeight {
  const int32_t* packed;      // [m, words_per_row], 4-bit codes
  int64_t words_per_row;
  const void* scales;         // [m, n / group]: fp16, or fp8 e4m3 bytes
  ScaleType scale_type;
  const float* codebooks;     // [siblings.count, 2, 16]
  const float* tensor_scale;  // [siblings.count] fp32, or nullptr (1)
  const float* channel_scale; // [siblings.count, n] or nullptr
  int64_t group;
  int64_t m, n;
  Siblings siblings;
};

// Sibling s of a fused weight as a plain weight of its own rows.
inline QamwWeight sibling_weight(const QamwWeight& w, int s) {
  QamwWeight v = w;
  const int64_t first = w.siblings.begin(s);
  v.packed += first * w.words_per_row;
  v.row_scale += first * w.scales_per_row;
  if (w.channel_scale) v.channel_scale += s * w.n;
  v.m = w.siblings.end[s] - first;
  v.siblings = Siblings{};
  return v;
}

inline AaacWeight sibling_weight(const AaacWeight& w, int s) {
  AaacWeight v = w;
  const int64_t first = w.siblings.begin(s), groups = w.n / w.group;
  v.packed += first * w.words_per_row;
  v.scales = static_cast<const char*>(w.scales) +
             first * groups * (w.scale_type == ScaleType::F16 ? 2 : 1);
  v.codebooks += s * 32;
  if (w.tensor_scale) v.tensor_scale += s;
  if (w.channel_scale) v.channel_scale += s * w.n;
  v.m = w.siblings.end[s] - first;
  v.siblings = Siblings{};
  return v;
}

constexpr int64_t dtype_bytes(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

// Runs gemv(sibling weight, its (batch, rows) output) for each sibling of a fused weight and
// copies the outputs into their columns of out (batch, m): what a launcher without a fused path
// of its own does.
template <typename W, typename F>
void gemv_each_sibling(const W& w, DType dtype, int64_t batch, void* out, F&& gemv) {
  const int64_t elem = dtype_bytes(dtype);
  std::vector<char> part;
  for (int s = 0; s < w.siblings.count; ++s) {
    const W v = sibling_weight(w, s);
    part.resize(static_cast<size_t>(batch * v.m * elem));
    gemv(v, static_cast<void*>(part.data()));
    const int64_t first = w.siblings.begin(s);
    for (int64_t b = 0; b < batch; ++b)
      std::memcpy(static_cast<char*>(out) + (b * w.m + first) * elem,
                  part.data() + b * v.m * elem, static_cast<size_t>(v.m * elem));
  }
}

// Runs dequantize(sibling weight, its rows of out) for each sibling of a fused weight.
template <typename W, typename F>
void dequantize_each_sibling(const W& w, DType dtype, void* out, F&& dequantize) {
  for (int s = 0; s < w.siblings.count; ++s)
    dequantize(sibling_weight(w, s),
               static_cast<void*>(static_cast<char*>(out) +
                                  w.siblings.begin(s) * w.n * dtype_bytes(dtype)));
}

namespace cpu {
void hadamard(const void* x, void* out, DType dtype, int64_t rows, int64_t n, int64_t block,
              const int8_t* signs, bool inverse);
void nearest_codeword_2d(const float* points, int64_t count, const float* codebook, int64_t K,
                         int32_t* out);
void nearest_codeword_1d(const float* values, int64_t count, const float* codebook, int64_t K,
                         int32_t* out);
void pack_bits(const int32_t* codes, int64_t rows, int64_t count, int bits, int32_t* packed);
void unpack_bits(const int32_t* packed, int64_t rows, int64_t count, int bits, int32_t* codes);
void qamw_gemv(const QamwWeight& w, const void* x, DType dtype, int64_t batch, void* out);
void qamw_dequantize(const QamwWeight& w, void* out, DType dtype);
void aaac_gemv(const AaacWeight& w, const void* x, DType dtype, int64_t batch, void* out);
void aaac_dequantize(const AaacWeight& w, void* out, DType dtype);
}  // namespace cpu

// CUDA launchers: same meaning, device pointers, `stream` is a cudaStream_t.
namespace cuda {
void hadamard(const void* x, void* out, DType dtype, int64_t rows, int64_t n, int64_t block,
              const int8_t* signs, bool inverse, void* stream);
void nearest_codeword_2d(const float* points, int64_t count, const float* codebook, int64_t K,
                         int32_t* out, void* stream);
void nearest_codeword_1d(const float* values, int64_t count, const float* codebook, int64_t K,
                         int32_t* out, void* stream);
void pack_bits(const int32_t* codes, int64_t rows, int64_t count, int bits, int32_t* packed,
               void* stream);
void unpack_bits(const int32_t* packed, int64_t rows, int64_t count, int bits, int32_t* codes,
                 void* stream);
// `workspace` holds qamw_gemv_workspace_floats(w, batch) floats: room for the rotated
// activation (one per sibling of a fused weight with channel scales) when it does not fit in
// shared memory, and for the tensor-core kernel's copy of it. At most 16 activation rows a
// call. The GEMV needs n / 2 / scales_per_row (pairs per row scale) to be a power of two, or
// scales_per_row = 1.
int64_t qamw_gemv_workspace_floats(const QamwWeight& w, int64_t batch);
void qamw_gemv(const QamwWeight& w, const void* x, DType dtype, int64_t batch, void* out,
               float* workspace, void* stream);
void qamw_dequantize(const QamwWeight& w, void* out, DType dtype, void* stream);
// `workspace` holds aaac_gemv_workspace_floats(w, batch) floats: the tensor-core kernel's copy
// of the activation, when it runs (else none; 8-byte aligned bf16 activations without channel
// scales are read in place). At most 16 activation rows a call.
int64_t aaac_gemv_workspace_floats(const AaacWeight& w, int64_t batch);
void aaac_gemv(const AaacWeight& w, const void* x, DType dtype, int64_t batch, void* out,
               float* workspace, void* stream);
void aaac_dequantize(const AaacWeight& w, void* out, DType dtype, void* stream);
}  // namespace cuda

}  // namespace qamw
