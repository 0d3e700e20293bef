// Argument checks shared by the torch wrappers: every message names the argument.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include "hadamard_tables.h"
#include "kernels.h"

#ifdef QAMW_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace qamw {

inline DType activation_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* name) {
  TORCH_CHECK(t.scalar_type() == expected, name, " must be ", expected, ", got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

inline void check_vector(const c10::optional<at::Tensor>& t, int64_t n, at::ScalarType dtype,
                         const at::Tensor& ref, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, name, " must have shape (", n, "), got ",
              t->sizes());
  check_dtype(*t, dtype, name);
  check_same_device(*t, ref, name, "the input");
}

// The siblings of a fused weight of m rows (kernels.h) from an op's sibling_rows: the row
// counts of the layers it holds, in order. Without it, one plain layer.
inline Siblings parse_siblings(at::OptionalIntArrayRef sibling_rows, int64_t m) {
  Siblings s;
  s.end[0] = m;
  if (!sibling_rows.has_value()) return s;
  const auto rows = *sibling_rows;
  TORCH_CHECK(!rows.empty() && rows.size() <= static_cast<size_t>(kMaxSiblings),
              "sibling_rows must list 1 to ", kMaxSiblings, " row counts, got ", rows);
  int64_t total = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    TORCH_CHECK(rows[i] > 0, "sibling_rows must be positive, got ", rows);
    total += rows[i];
    s.end[i] = total;
  }
  TORCH_CHECK(total == m, "sibling_rows ", rows, " add up to ", total, " but the weight has ", m,
              " rows");
  s.count = static_cast<int>(rows.size());
  return s;
}

// A per-layer parameter of shape `shape`, or (siblings, *shape) when the op was given
// sibling_rows (one per sibling of a fused weight).
inline void check_per_sibling(const at::Tensor& t, at::IntArrayRef shape, bool fused,
                              int siblings, at::ScalarType dtype, const at::Tensor& ref,
                              const char* name) {
  std::vector<int64_t> expected(shape.begin(), shape.end());
  if (fused) expected.insert(expected.begin(), siblings);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), name, " must have shape ",
              at::IntArrayRef(expected), fused ? " (one per sibling)" : "", ", got ", t.sizes());
  check_dtype(t, dtype, name);
  check_same_device(t, ref, name, "the input");
}

inline bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// A Hadamard block: a power of two, or K * 2^m with a tabulated order K (hadamard_tables.h).
inline void check_block_size(int64_t block, int64_t n) {
  TORCH_CHECK(block <= 32768 && split_hadamard_block(block).order > 0,
              "block_size must be a power of two from 2 to 32768, or K * 2^m up to 32768 with K "
              "one of ", kHadamardOrderList, " (e.g. 576 = 36 * 16), got ", block);
  TORCH_CHECK(n % block == 0, "block_size ", block, " does not divide the last dimension ", n);
}

// Sizes above this are refused before any size arithmetic (count * bits) could overflow.
constexpr int64_t kMaxFeatures = int64_t{1} << 40;

// A codebook with NaN or inf has no meaningful nearest entry (and breaks the sorted search).
inline void check_finite(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), name, " must be finite (no NaN or inf)");
}

inline void check_bits(int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 16, "bits must be from 1 to 16, got ", bits);
}

// The contiguous int8 signs / fp32 vector data pointer of an optional argument, or nullptr.
template <typename T>
inline const T* optional_data(const c10::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t) return nullptr;
  keep = t->contiguous();
  return keep.data_ptr<T>();
}

#ifdef QAMW_WITH_CUDA
inline void* cuda_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#endif

}  // namespace qamw
