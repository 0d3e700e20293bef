// torch wrapper of the block Hadamard transform.
#include "checks.h"

namespace qamw {

static at::Tensor hadamard(const at::Tensor& x, int64_t block_size,
                           const c10::optional<at::Tensor>& signs, bool inverse) {
  const DType dtype = activation_dtype(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  const int64_t n = x.size(-1);
  check_block_size(block_size, n);
  check_vector(signs, n, at::kChar, x, "signs");
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t rows = n == 0 ? 0 : input.numel() / n;
  if (rows == 0) return out;
  at::Tensor signs_c;
  const int8_t* s = optional_data<int8_t>(signs, signs_c);
  if (x.is_cuda()) {
#ifdef QAMW_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::hadamard(input.data_ptr(), out.data_ptr(), dtype, rows, n, block_size, s, inverse,
                   cuda_stream(x));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    cpu::hadamard(input.data_ptr(), out.data_ptr(), dtype, rows, n, block_size, s, inverse);
  }
  return out;
}

TORCH_LIBRARY_IMPL(qamw_ext, CPU, m) { m.impl("hadamard", &hadamard); }
#ifdef QAMW_WITH_CUDA
TORCH_LIBRARY_IMPL(qamw_ext, CUDA, m) { m.impl("hadamard", &hadamard); }
#endif

}  // namespace qamw
