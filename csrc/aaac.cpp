// torch wrappers of the AAAC GEMV and dequantize.
#include "checks.h"

namespace qamw {
namespace {

struct AaacArgs {
  at::Tensor packed, scales, codebooks, tensor_scale, channel_scale;
  AaacWeight view{};
};

AaacArgs aaac_args(const at::Tensor& packed, const at::Tensor& scales,
                   const at::Tensor& codebooks, const c10::optional<at::Tensor>& tensor_scale,
                   const c10::optional<at::Tensor>& channel_scale, int64_t group_size,
                   at::OptionalIntArrayRef sibling_rows) {
  TORCH_CHECK(is_power_of_two(group_size) && group_size >= 16 && group_size <= 256,
              "group_size must be a power of two from 16 to 256, got ", group_size);
  check_dtype(packed, at::kInt, "packed");
  TORCH_CHECK(packed.dim() == 2, "packed must have shape (out_features, words), got ",
              packed.sizes());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == packed.size(0),
              "scales must have shape (out_features, in_features / group_size) with "
              "out_features = ", packed.size(0), ", got ", scales.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat8_e4m3fn,
              "scales must be float16 or float8_e4m3fn, got ", scales.scalar_type());
  check_same_device(scales, packed, "scales", "packed");
  TORCH_CHECK(scales.size(1) > 0 && scales.size(1) <= kMaxFeatures / group_size,
              "in_features = scales.shape[1] * group_size must be from 1 to 2^40, got ",
              scales.size(1), " * ", group_size);
  const int64_t m = packed.size(0), n = scales.size(1) * group_size;
  const int64_t words = packed_words_per_row(n, 4);
  TORCH_CHECK(packed.size(1) == words, "packed must have ", words, " int32 words per row for ",
              n, " 4-bit codes, got ", packed.size(1));
  const Siblings siblings = parse_siblings(sibling_rows, m);
  const bool fused = sibling_rows.has_value();
  check_per_sibling(codebooks, {2, 16}, fused, siblings.count, at::kFloat, packed, "codebooks");
  if (tensor_scale) {
    check_dtype(*tensor_scale, at::kFloat, "tensor_scale");
    TORCH_CHECK(tensor_scale->numel() == siblings.count, "tensor_scale must hold ",
                fused ? "one value per sibling" : "one value", ", got ", tensor_scale->sizes());
    check_same_device(*tensor_scale, packed, "tensor_scale", "packed");
  }
  if (channel_scale)
    check_per_sibling(*channel_scale, {n}, fused, siblings.count, at::kFloat, packed,
                      "channel_scale");

  AaacArgs a;
  a.packed = packed.contiguous();
  a.scales = scales.contiguous();
  a.codebooks = codebooks.contiguous();
  AaacWeight& w = a.view;
  w.packed = a.packed.data_ptr<int32_t>();
  w.words_per_row = words;
  w.scales = a.scales.data_ptr();
  w.scale_type = scales.scalar_type() == at::kHalf ? ScaleType::F16 : ScaleType::F8E4M3;
  w.codebooks = a.codebooks.data_ptr<float>();
  w.tensor_scale = optional_data<float>(tensor_scale, a.tensor_scale);
  w.channel_scale = optional_data<float>(channel_scale, a.channel_scale);
  w.group = group_size;
  w.m = m;
  w.n = n;
  w.siblings = siblings;
  return a;
}

}  // namespace

static at::Tensor aaac_gemv(const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& scales, const at::Tensor& codebooks,
                            const c10::optional<at::Tensor>& tensor_scale,
                            const c10::optional<at::Tensor>& channel_scale, int64_t group_size,
                            at::OptionalIntArrayRef sibling_rows) {
  const DType dtype = activation_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must have shape (batch, in_features), got ", x.sizes());
  check_same_device(packed, x, "packed", "x");
  const AaacArgs a = aaac_args(packed, scales, codebooks, tensor_scale, channel_scale,
                               group_size, sibling_rows);
  TORCH_CHECK(x.size(1) == a.view.n, "x has ", x.size(1), " features but the weight has ",
              a.view.n, " (scales.shape[1] * group_size)");
  const at::Tensor input = x.contiguous();
  const int64_t batch = x.size(0), m = a.view.m;
  at::Tensor out = at::empty({batch, m}, x.options());
  if (batch == 0 || m == 0) return out;
  if (x.is_cuda()) {
#ifdef QAMW_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t step = 16, elem = x.element_size();
    at::Tensor workspace =
        at::empty({cuda::aaac_gemv_workspace_floats(a.view, std::min(batch, step))},
                  x.options().dtype(at::kFloat));
    for (int64_t b = 0; b < batch; b += step) {
      cuda::aaac_gemv(a.view, static_cast<const char*>(input.data_ptr()) + b * a.view.n * elem,
                      dtype, std::min(step, batch - b),
                      static_cast<char*>(out.data_ptr()) + b * m * elem,
                      workspace.data_ptr<float>(), cuda_stream(x));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
#endif
  } else {
    cpu::aaac_gemv(a.view, input.data_ptr(), dtype, batch, out.data_ptr());
  }
  return out;
}

static at::Tensor aaac_dequantize(const at::Tensor& packed, const at::Tensor& scales,
                                  const at::Tensor& codebooks,
                                  const c10::optional<at::Tensor>& tensor_scale,
                                  const c10::optional<at::Tensor>& channel_scale,
                                  int64_t group_size, at::ScalarType dtype,
                                  at::OptionalIntArrayRef sibling_rows) {
  const AaacArgs a = aaac_args(packed, scales, codebooks, tensor_scale, channel_scale,
                               group_size, sibling_rows);
  at::Tensor out = at::empty({a.view.m, a.view.n}, packed.options().dtype(dtype));
  const DType out_dtype = activation_dtype(out, "dtype");
  if (a.view.m == 0) return out;
  if (packed.is_cuda()) {
#ifdef QAMW_WITH_CUDA
    const c10::cuda::CUDAGuard guard(packed.device());
    cuda::aaac_dequantize(a.view, out.data_ptr(), out_dtype, cuda_stream(packed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    cpu::aaac_dequantize(a.view, out.data_ptr(), out_dtype);
  }
  return out;
}

TORCH_LIBRARY_IMPL(qamw_ext, CPU, m) {
  m.impl("aaac_gemv", &aaac_gemv);
  m.impl("aaac_dequantize", &aaac_dequantize);
}
#ifdef QAMW_WITH_CUDA
TORCH_LIBRARY_IMPL(qamw_ext, CUDA, m) {
  m.impl("aaac_gemv", &aaac_gemv);
  m.impl("aaac_dequantize", &aaac_dequantize);
}
#endif

}  // namespace qamw
