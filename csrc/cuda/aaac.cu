// AAAC GEMV and dequantize on the GPU: 4-bit codes into one of two 16-entry codebooks per
// group, chosen by the sign bit of the group's scale (fp16, or fp8 e4m3 with a tensor scale).
//
// GEMV: a thread owns one 16-byte vector of a row at a time (32 codes, consecutive lanes on
// consecutive vectors: coalesced), a power-of-two group of lanes shares a row and reduces with
// shuffles; CTAs are persistent and stride over rows. Both codebooks are copied once per lane
// into shared memory (entry e of lane l at e * 32 + l): each lane always reads its own bank, so
// the data-dependent lookups are free of bank conflicts. The activation, divided by the channel
// scale, is staged in shared memory as fp32 with 4 padding floats per 32 values (lanes read
// 16-byte vectors 36 floats apart: no conflicts); when it does not fit, it is read from global.
#include "common.cuh"

namespace qamw::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;          // codes in one 16-byte vector
constexpr int kChunkStride = 36;    // floats per chunk of the staged activation

// |s| of an e4m3fn byte without its sign bit: bias 7, subnormals, 0x7F is NaN (no infinities).
__device__ __forceinline__ float e4m3_magnitude(uint32_t m) {
  if (m == 0x7Fu) return __int_as_float(0x7fc00000);
  const uint32_t e = m >> 3, mant = m & 7u;
  if (e == 0) return static_cast<float>(mant) * 0.001953125f;  // mant * 2^-9
  return __int_as_float(static_cast<int>(((e + 120u) << 23) | (mant << 20)));
}

// (codebook choice, magnitude) of scale g of row `row`.
__device__ __forceinline__ void decode_scale(const void* scales, ScaleType type, int64_t index,
                                             int& choice, float& magnitude) {
  if (type == ScaleType::F16) {
    const uint32_t raw = static_cast<const uint16_t*>(scales)[index];
    choice = static_cast<int>(raw >> 15);
    magnitude = __half2float(__ushort_as_half(static_cast<unsigned short>(raw & 0x7FFFu)));
  } else {
    const uint32_t raw = static_cast<const uint8_t*>(scales)[index];
    choice = static_cast<int>(raw >> 7);
    magnitude = e4m3_magnitude(raw & 0x7Fu);
  }
}

// Index in shared memory of activation value j: 4 padding floats after every 32 values.
struct ChunkIndex {
  __device__ int operator()(int j) const { return (j / kChunk) * kChunkStride + j % kChunk; }
};

struct GemvParams {
  AaacWeight w;
  int chunks_per_row, group_lanes, batch;
  const void* x;
  DType dtype;
  void* out;
  bool packed_vec;  // packed rows are 16-byte aligned
  bool x_vec;       // stage_activation may use vector loads
};

// XS: the activation is staged in shared memory (else read from global, divided on the fly).
// (kThreads, 1): without a minimum, ptxas was seen to cap some variants at 64 registers and spill.
template <int NB, bool XS>
__global__ void __launch_bounds__(kThreads, 1) aaac_gemv_kernel(GemvParams p) {
  extern __shared__ __align__(16) float smem[];
  float* cb_s = smem;               // [32 entries][32 lanes]
  float* x_s = smem + 32 * 32;      // [batch][chunks_per_row * kChunkStride]
  const AaacWeight& w = p.w;
  const int n = static_cast<int>(w.n);
  const int x_row = p.chunks_per_row * kChunkStride;

  const int G = p.group_lanes;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane & (G - 1);
  const int rows_per_warp = 32 / G;
  const int64_t rows_per_cta = int64_t{kWarps} * rows_per_warp;
  const int row_in_cta = warp * rows_per_warp + lane / G;
  const int64_t row_stride = gridDim.x * rows_per_cta;
  // Vector c of `row`; a lane keeps the next one in flight while it decodes the current one.
  const auto load_vector = [&](int64_t row, int c) {
    const uint4* rowp = reinterpret_cast<const uint4*>(w.packed + row * w.words_per_row);
    if (p.packed_vec) return __ldg(rowp + c);
    const uint32_t* r32 = reinterpret_cast<const uint32_t*>(rowp + c);
    return make_uint4(__ldg(r32), __ldg(r32 + 1), __ldg(r32 + 2), __ldg(r32 + 3));
  };
  // The first vector travels from DRAM while the CTA stages the codebooks and the activation.
  const int64_t first_row = blockIdx.x * rows_per_cta + row_in_cta;
  uint4 q = first_row < w.m && sub < p.chunks_per_row ? load_vector(first_row, sub)
                                                       : make_uint4(0, 0, 0, 0);

  for (int i = threadIdx.x; i < 32 * 32; i += kThreads) cb_s[i] = w.codebooks[i / 32];
  if constexpr (XS) {
    with_typed_activation(p.x, p.dtype, [&](auto* x) {
      stage_activation(x, n, p.batch, w.channel_scale, nullptr, 1.0f, p.x_vec, x_s, x_row,
                       ChunkIndex{});
    });
  }
  __syncthreads();

  const int64_t groups = w.n / w.group;
  const int group_log2 = __ffs(static_cast<int>(w.group)) - 1;
  const float tensor_scale = w.tensor_scale ? *w.tensor_scale : 1.0f;
  const float* my_cb = cb_s + lane;

  for (int64_t row0 = blockIdx.x * rows_per_cta; row0 < w.m; row0 += row_stride) {
    const int64_t row = row0 + row_in_cta;
    float acc[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[b] = 0.0f;
    if (row < w.m) {
      for (int c = sub; c < p.chunks_per_row; c += G) {
        // q holds vector c; load the lane's next one: c + G, or the first of its next row.
        const bool same_row = c + G < p.chunks_per_row;
        const int64_t next_row = same_row ? row : row + row_stride;
        const uint4 q_next = next_row < w.m ? load_vector(next_row, same_row ? c + G : sub)
                                            : make_uint4(0, 0, 0, 0);
        // Two halves of 16 codes: a group has at least 16 codes, so a half has one scale.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int j0 = c * kChunk + 16 * h;
          if (j0 >= n) continue;  // n is a multiple of 16: the last vector may hold one half
          int choice;
          float magnitude;
          decode_scale(w.scales, w.scale_type, row * groups + (j0 >> group_log2), choice,
                       magnitude);
          const float* cb = my_cb + choice * 16 * 32;
          float part[NB];
#pragma unroll
          for (int b = 0; b < NB; ++b) part[b] = 0.0f;
#pragma unroll
          for (int quad = 0; quad < 4; ++quad) {
            float wv[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int jj = 16 * h + 4 * quad + e;
              const uint32_t word = jj < 8 ? q.x : jj < 16 ? q.y : jj < 24 ? q.z : q.w;
              wv[e] = cb[((word >> (4 * (jj % 8))) & 15u) * 32];
            }
#pragma unroll
            for (int b = 0; b < NB; ++b) {
              if (b < p.batch) {
                float4 xv;
                if constexpr (XS) {
                  xv = *reinterpret_cast<const float4*>(x_s + b * x_row + c * kChunkStride +
                                                        16 * h + 4 * quad);
                } else {
                  float t[4];
#pragma unroll
                  for (int e = 0; e < 4; ++e) {
                    const int j = j0 + 4 * quad + e;
                    t[e] = load_as_float(p.x, p.dtype, int64_t{b} * n + j);
                    if (w.channel_scale) t[e] /= w.channel_scale[j];
                  }
                  xv = make_float4(t[0], t[1], t[2], t[3]);
                }
                part[b] = fmaf(wv[0], xv.x, part[b]);
                part[b] = fmaf(wv[1], xv.y, part[b]);
                part[b] = fmaf(wv[2], xv.z, part[b]);
                part[b] = fmaf(wv[3], xv.w, part[b]);
              }
            }
          }
#pragma unroll
          for (int b = 0; b < NB; ++b) acc[b] = fmaf(magnitude, part[b], acc[b]);
        }
        q = q_next;
      }
    }
    // Every lane reaches the shuffles: the loop over row0 is uniform across the CTA.
    for (int off = G / 2; off > 0; off /= 2) {
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], off);
    }
    if (sub == 0 && row < w.m) {
#pragma unroll
      for (int b = 0; b < NB; ++b)
        if (b < p.batch) store_from_float(p.out, p.dtype, b * w.m + row, acc[b] * tensor_scale);
    }
  }
}

// One thread per packed word (8 codes) of real data: 8 outputs, stored as 16-byte vectors.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    aaac_dequantize_kernel(AaacWeight w, T* __restrict__ out, bool vec) {
  const int64_t words = w.n / 8, total = w.m * words, groups = w.n / w.group;
  const float tensor_scale = w.tensor_scale ? *w.tensor_scale : 1.0f;
  for (int64_t e = blockIdx.x * int64_t{kThreads} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * kThreads) {
    const int64_t row = e / words, wi = e - row * words, j0 = 8 * wi;
    const uint32_t word = static_cast<uint32_t>(w.packed[row * w.words_per_row + wi]);
    int choice;
    float magnitude;
    decode_scale(w.scales, w.scale_type, row * groups + j0 / w.group, choice, magnitude);
    const float* cb = w.codebooks + 16 * choice;
    const float s = magnitude * tensor_scale;
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      v[k] = cb[(word >> (4 * k)) & 15u] * s;
      if (w.channel_scale) v[k] /= w.channel_scale[j0 + k];
    }
    store_floats<T, 8>(out + row * w.n + j0, v, vec);
  }
}

}  // namespace

void aaac_gemv(const AaacWeight& w, const void* x, DType dtype, int64_t batch, void* out,
               void* stream) {
  if (batch == 0 || w.m == 0) return;
  GemvParams p{};
  p.w = w;
  p.chunks_per_row = static_cast<int>(ceil_div(w.n, kChunk));
  // At most 16 lanes a row: the two or more rows of a warp then read the same activation
  // vectors, which shared memory broadcasts (half the wavefronts of 32 lanes on one row).
  p.group_lanes = 1;
  while (p.group_lanes < 16 && p.group_lanes < p.chunks_per_row) p.group_lanes *= 2;
  p.batch = static_cast<int>(batch);
  p.x = x;
  p.dtype = dtype;
  p.out = out;
  p.packed_vec = aligned16(w.packed);
  p.x_vec = stage_vectors(x, w.channel_scale, nullptr, w.n);
  const size_t x_bytes = sizeof(float) * batch * p.chunks_per_row * kChunkStride;
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int optin = shared_per_block_optin();
  dispatch_batch(batch, [&](auto nb) {
    auto launch = [&](auto kernel, size_t smem) {
      if (smem > 48 * 1024)
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
      int per_sm = 0;
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
      const int64_t rows_per_cta = int64_t{kWarps} * (32 / p.group_lanes);
      const int64_t wanted = ceil_div(w.m, rows_per_cta);
      const int64_t resident = int64_t{sms} * (per_sm > 0 ? per_sm : 1);
      const unsigned grid = static_cast<unsigned>(wanted < resident ? wanted : resident);
      kernel<<<grid, kThreads, smem, as_stream(stream)>>>(p);
    };
    const size_t cb_bytes = sizeof(float) * 32 * 32;
    // Staged whenever the device's shared memory holds it: even at one CTA per SM, one 16-byte
    // shared load per 4 weights beats two global loads and a division per weight.
    if (cb_bytes + x_bytes <= static_cast<size_t>(optin))
      launch(aaac_gemv_kernel<decltype(nb)::value, true>, cb_bytes + x_bytes);
    else
      launch(aaac_gemv_kernel<decltype(nb)::value, false>, cb_bytes);
  });
}

void aaac_dequantize(const AaacWeight& w, void* out, DType dtype, void* stream) {
  if (w.m == 0 || w.n == 0) return;
  const unsigned grid = capped_grid(ceil_div(w.m * (w.n / 8), kThreads));
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    aaac_dequantize_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
        w, static_cast<T*>(out), aligned16(out));
  });
}

}  // namespace qamw::cuda
