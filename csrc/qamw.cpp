// torch wrappers of the QAM-W GEMV and dequantize.
#include "checks.h"

namespace qamw {
namespace {

// The checked, contiguous tensors of a QAM-W weight and the kernel view of them.
struct QamwArgs {
  at::Tensor packed, codebook, row_scale, channel_scale, signs;
  QamwWeight view{};
};

QamwArgs qamw_args(const at::Tensor& packed, const at::Tensor& codebook,
                   const at::Tensor& row_scale, const c10::optional<at::Tensor>& channel_scale,
                   const c10::optional<at::Tensor>& signs, int64_t bits, int64_t block_size,
                   int64_t n, const char* n_name, at::OptionalIntArrayRef sibling_rows) {
  TORCH_CHECK(bits >= 4 && bits <= 12, "bits must be from 4 to 12 (QAM-W bits per pair), got ",
              bits);
  TORCH_CHECK(n >= 2 && n % 2 == 0 && n <= kMaxFeatures, n_name,
              " must be even, from 2 to 2^40, got ", n);
  check_block_size(block_size, n);
  check_dtype(packed, at::kInt, "packed");
  TORCH_CHECK(packed.dim() == 2, "packed must have shape (out_features, words), got ",
              packed.sizes());
  const int64_t m = packed.size(0);
  const int64_t words = packed_words_per_row(n / 2, static_cast<int>(bits));
  TORCH_CHECK(packed.size(1) == words, "packed must have ", words, " int32 words per row for ",
              n_name, " = ", n, " (", n / 2, " codes of ", bits, " bits), got ", packed.size(1));
  check_dtype(codebook, at::kFloat, "codebook");
  TORCH_CHECK(codebook.dim() == 2 && codebook.size(0) == (int64_t{1} << bits) &&
                  codebook.size(1) == 2,
              "codebook must have shape (2^bits, 2) = (", int64_t{1} << bits,
              ", 2) so that every code is in range, got ", codebook.sizes());
  check_same_device(codebook, packed, "codebook", "packed");
  check_dtype(row_scale, at::kFloat, "row_scale");
  check_same_device(row_scale, packed, "row_scale", "packed");
  const int64_t blocks = n / block_size;
  const bool per_row = row_scale.dim() == 1 && row_scale.size(0) == m;
  const bool per_block = row_scale.dim() == 2 && row_scale.size(0) == m &&
                         row_scale.size(1) == blocks;
  TORCH_CHECK(per_row || per_block, "row_scale must have shape (", m, ") or (", m, ", ", blocks,
              "), got ", row_scale.sizes());
  const Siblings siblings = parse_siblings(sibling_rows, m);
  if (channel_scale)
    check_per_sibling(*channel_scale, {n}, sibling_rows.has_value(), siblings.count, at::kFloat,
                      packed, "channel_scale");
  check_vector(signs, n, at::kChar, packed, "signs");

  QamwArgs a;
  a.packed = packed.contiguous();
  a.codebook = codebook.contiguous();
  a.row_scale = row_scale.contiguous();
  QamwWeight& w = a.view;
  w.packed = a.packed.data_ptr<int32_t>();
  w.words_per_row = words;
  w.codebook = a.codebook.data_ptr<float>();
  w.bits = static_cast<int>(bits);
  w.row_scale = a.row_scale.data_ptr<float>();
  w.scales_per_row = per_row ? 1 : blocks;
  w.channel_scale = optional_data<float>(channel_scale, a.channel_scale);
  w.signs = optional_data<int8_t>(signs, a.signs);
  w.block = block_size;
  w.m = m;
  w.n = n;
  w.siblings = siblings;
  return a;
}

}  // namespace

static at::Tensor qamw_gemv(const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& codebook, const at::Tensor& row_scale,
                            const c10::optional<at::Tensor>& channel_scale,
                            const c10::optional<at::Tensor>& signs, int64_t bits,
                            int64_t block_size, at::OptionalIntArrayRef sibling_rows) {
  const DType dtype = activation_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must have shape (batch, in_features), got ", x.sizes());
  check_same_device(packed, x, "packed", "x");
  const QamwArgs a = qamw_args(packed, codebook, row_scale, channel_scale, signs, bits,
                               block_size, x.size(1), "x.shape[1]", sibling_rows);
  const at::Tensor input = x.contiguous();
  const int64_t batch = x.size(0), m = a.view.m;
  at::Tensor out = at::empty({batch, m}, x.options());
  if (batch == 0 || m == 0) return out;
  if (x.is_cuda()) {
#ifdef QAMW_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    // The kernel applies row scales to power-of-two runs of pairs. Per-block scales of blocks
    // of K * 2^m (segments of K * 2^m / 2 pairs, K 4 times an odd number) are repeated K / 4
    // times, once for each run of the segment's largest power-of-two divisor.
    QamwWeight view = a.view;
    at::Tensor repeated;
    const int64_t n = view.n, segment = n / 2 / view.scales_per_row;
    if (view.scales_per_row > 1 && (segment & (segment - 1)) != 0) {
      const int64_t run = segment & -segment, copies = segment / run;
      repeated = a.row_scale.unsqueeze(2)
                     .expand({view.m, view.scales_per_row, copies})
                     .reshape({view.m, view.scales_per_row * copies});
      view.row_scale = repeated.data_ptr<float>();
      view.scales_per_row *= copies;
    }
    // The kernel serves up to 16 activation rows per launch; the workspace holds them rotated
    // once per sibling.
    const int64_t step = 16;
    at::Tensor workspace =
        at::empty({cuda::qamw_gemv_workspace_floats(view, std::min(batch, step))},
                  x.options().dtype(at::kFloat));
    const int64_t elem = x.element_size();
    for (int64_t b = 0; b < batch; b += step) {
      const int64_t rows = std::min(step, batch - b);
      cuda::qamw_gemv(view, static_cast<const char*>(input.data_ptr()) + b * n * elem, dtype,
                      rows, static_cast<char*>(out.data_ptr()) + b * m * elem,
                      workspace.data_ptr<float>(), cuda_stream(x));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
#endif
  } else {
    cpu::qamw_gemv(a.view, input.data_ptr(), dtype, batch, out.data_ptr());
  }
  return out;
}

static at::Tensor qamw_dequantize(const at::Tensor& packed, const at::Tensor& codebook,
                                  const at::Tensor& row_scale,
                                  const c10::optional<at::Tensor>& channel_scale,
                                  const c10::optional<at::Tensor>& signs, int64_t bits,
                                  int64_t block_size, int64_t in_features,
                                  at::ScalarType dtype, at::OptionalIntArrayRef sibling_rows) {
  const QamwArgs a = qamw_args(packed, codebook, row_scale, channel_scale, signs, bits,
                               block_size, in_features, "in_features", sibling_rows);
  at::Tensor out = at::empty({a.view.m, in_features}, packed.options().dtype(dtype));
  const DType out_dtype = activation_dtype(out, "dtype");
  if (a.view.m == 0) return out;
  if (packed.is_cuda()) {
#ifdef QAMW_WITH_CUDA
    const c10::cuda::CUDAGuard guard(packed.device());
    cuda::qamw_dequantize(a.view, out.data_ptr(), out_dtype, cuda_stream(packed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    cpu::qamw_dequantize(a.view, out.data_ptr(), out_dtype);
  }
  return out;
}

TORCH_LIBRARY_IMPL(qamw_ext, CPU, m) {
  m.impl("qamw_gemv", &qamw_gemv);
  m.impl("qamw_dequantize", &qamw_dequantize);
}
#ifdef QAMW_WITH_CUDA
TORCH_LIBRARY_IMPL(qamw_ext, CUDA, m) {
  m.impl("qamw_gemv", &qamw_gemv);
  m.impl("qamw_dequantize", &qamw_dequantize);
}
#endif

}  // namespace qamw
