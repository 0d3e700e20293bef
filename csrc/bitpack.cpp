// torch wrappers of bit packing and unpacking.
#include "checks.h"

namespace qamw {

static at::Tensor pack_bits(const at::Tensor& codes, int64_t bits) {
  check_bits(bits);
  check_dtype(codes, at::kInt, "codes");
  TORCH_CHECK(codes.dim() >= 1, "codes must have at least one dimension");
  const int64_t count = codes.size(-1);
  TORCH_CHECK(count <= kMaxFeatures, "codes rows of ", count, " codes are too long (at most 2^40)");
  const int64_t rows = count == 0 ? 0 : codes.numel() / count;
  auto shape = codes.sizes().vec();
  shape.back() = packed_words_per_row(count, static_cast<int>(bits));
  // Allocated before the range scan, so that an input too large to pack (an expanded view,
  // say) fails at once instead of after a scan of all its elements.
  at::Tensor out = at::zeros(shape, codes.options());
  if (codes.numel() > 0) {
    // One reduction pass: codes that do not fit in `bits` would corrupt their neighbours.
    const auto [lo, hi] = at::aminmax(codes);
    const int64_t low = lo.item<int64_t>(), high = hi.item<int64_t>();
    TORCH_CHECK(low >= 0 && high < (int64_t{1} << bits), "codes must lie in [0, 2^", bits,
                ") = [0, ", (int64_t{1} << bits), "), got values in [", low, ", ", high, "]");
  }
  if (rows == 0 || count == 0) return out;
  const at::Tensor c = codes.contiguous();
  if (codes.is_cuda()) {
#ifdef QAMW_WITH_CUDA
    const c10::cuda::CUDAGuard guard(codes.device());
    cuda::pack_bits(c.data_ptr<int32_t>(), rows, count, static_cast<int>(bits),
                    out.data_ptr<int32_t>(), cuda_stream(codes));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    cpu::pack_bits(c.data_ptr<int32_t>(), rows, count, static_cast<int>(bits),
                   out.data_ptr<int32_t>());
  }
  return out;
}

static at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, int64_t count) {
  check_bits(bits);
  check_dtype(packed, at::kInt, "packed");
  TORCH_CHECK(packed.dim() >= 1, "packed must have at least one dimension");
  TORCH_CHECK(count >= 0 && count <= kMaxFeatures, "count must be from 0 to 2^40, got ", count);
  const int64_t words = packed_words_per_row(count, static_cast<int>(bits));
  TORCH_CHECK(packed.size(-1) == words, "packed rows of ", count, " codes of ", bits,
              " bits must hold ", words, " int32 words, got ", packed.size(-1));
  auto shape = packed.sizes().vec();
  shape.back() = count;
  at::Tensor out = at::empty(shape, packed.options());
  const int64_t rows = words == 0 ? 0 : packed.numel() / words;
  if (rows == 0 || count == 0) return out;
  const at::Tensor p = packed.contiguous();
  if (packed.is_cuda()) {
#ifdef QAMW_WITH_CUDA
    const c10::cuda::CUDAGuard guard(packed.device());
    cuda::unpack_bits(p.data_ptr<int32_t>(), rows, count, static_cast<int>(bits),
                      out.data_ptr<int32_t>(), cuda_stream(packed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    cpu::unpack_bits(p.data_ptr<int32_t>(), rows, count, static_cast<int>(bits),
                     out.data_ptr<int32_t>());
  }
  return out;
}

TORCH_LIBRARY_IMPL(qamw_ext, CPU, m) {
  m.impl("pack_bits", &pack_bits);
  m.impl("unpack_bits", &unpack_bits);
}
#ifdef QAMW_WITH_CUDA
TORCH_LIBRARY_IMPL(qamw_ext, CUDA, m) {
  m.impl("pack_bits", &pack_bits);
  m.impl("unpack_bits", &unpack_bits);
}
#endif

}  // namespace qamw
