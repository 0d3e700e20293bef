// torch wrappers of the nearest-codeword searches.
#include "checks.h"

namespace qamw {

static at::Tensor nearest_codeword_2d(const at::Tensor& points, const at::Tensor& codebook) {
  check_dtype(points, at::kFloat, "points");
  check_dtype(codebook, at::kFloat, "codebook");
  check_same_device(codebook, points, "codebook", "points");
  TORCH_CHECK(points.dim() >= 1 && points.size(-1) == 2,
              "points must have shape (..., 2), got ", points.sizes());
  TORCH_CHECK(codebook.dim() == 2 && codebook.size(1) == 2 && codebook.size(0) >= 1 &&
                  codebook.size(0) <= 4096,
              "codebook must have shape (K, 2) with 1 <= K <= 4096, got ", codebook.sizes());
  check_finite(codebook, "codebook");
  const at::Tensor p = points.contiguous(), c = codebook.contiguous();
  at::Tensor out = at::empty(points.sizes().slice(0, points.dim() - 1),
                             points.options().dtype(at::kInt));
  const int64_t count = out.numel(), K = c.size(0);
  if (count == 0) return out;
  if (points.is_cuda()) {
#ifdef QAMW_WITH_CUDA
    const c10::cuda::CUDAGuard guard(points.device());
    cuda::nearest_codeword_2d(p.data_ptr<float>(), count, c.data_ptr<float>(), K,
                              out.data_ptr<int32_t>(), cuda_stream(points));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    cpu::nearest_codeword_2d(p.data_ptr<float>(), count, c.data_ptr<float>(), K,
                             out.data_ptr<int32_t>());
  }
  return out;
}

static at::Tensor nearest_codeword_1d(const at::Tensor& values, const at::Tensor& codebook) {
  check_dtype(values, at::kFloat, "values");
  check_dtype(codebook, at::kFloat, "codebook");
  check_same_device(codebook, values, "codebook", "values");
  TORCH_CHECK(codebook.dim() == 1 && codebook.size(0) >= 1 && codebook.size(0) <= 65536,
              "codebook must have shape (K,) with 1 <= K <= 65536, got ", codebook.sizes());
  check_finite(codebook, "codebook");
  const at::Tensor v = values.contiguous(), c = codebook.contiguous();
  at::Tensor out = at::empty(values.sizes(), values.options().dtype(at::kInt));
  const int64_t count = out.numel(), K = c.size(0);
  if (count == 0) return out;
  if (values.is_cuda()) {
#ifdef QAMW_WITH_CUDA
    const c10::cuda::CUDAGuard guard(values.device());
    cuda::nearest_codeword_1d(v.data_ptr<float>(), count, c.data_ptr<float>(), K,
                              out.data_ptr<int32_t>(), cuda_stream(values));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    cpu::nearest_codeword_1d(v.data_ptr<float>(), count, c.data_ptr<float>(), K,
                             out.data_ptr<int32_t>());
  }
  return out;
}

TORCH_LIBRARY_IMPL(qamw_ext, CPU, m) {
  m.impl("nearest_codeword_2d", &nearest_codeword_2d);
  m.impl("nearest_codeword_1d", &nearest_codeword_1d);
}
#ifdef QAMW_WITH_CUDA
TORCH_LIBRARY_IMPL(qamw_ext, CUDA, m) {
  m.impl("nearest_codeword_2d", &nearest_codeword_2d);
  m.impl("nearest_codeword_1d", &nearest_codeword_1d);
}
#endif

}  // namespace qamw
