// Exact nearest codeword search on the GPU, by brute force over a codebook staged through
// shared memory in tiles. Each thread owns kPointsPerThread points so that every shared-memory
// read (a broadcast: all lanes read the same codeword) serves several distance computations.
// Ties go to the lowest index: tiles and codewords are visited in ascending order and only a
// strictly smaller distance replaces the best. A NaN point never compares smaller: index 0.
// Distances are rounded exactly as the reference computes them (no fused multiply-add).
#include "common.cuh"

namespace qamw::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPointsPerThread = 4;
constexpr int kTile2d = 4096;  // float2 codewords: 32 KiB
constexpr int kTile1d = 8192;  // floats: 32 KiB

__global__ void __launch_bounds__(kThreads)
    nearest_2d_kernel(const float* __restrict__ points, int64_t count,
                      const float* __restrict__ codebook, int64_t K, int32_t* __restrict__ out) {
  __shared__ float2 tile[kTile2d];
  const int64_t span = int64_t{kThreads} * kPointsPerThread;
  for (int64_t first = blockIdx.x * span; first < count; first += int64_t{gridDim.x} * span) {
    float px[kPointsPerThread], py[kPointsPerThread], best[kPointsPerThread];
    int32_t arg[kPointsPerThread];
#pragma unroll
    for (int q = 0; q < kPointsPerThread; ++q) {
      const int64_t p = first + q * kThreads + threadIdx.x;
      px[q] = p < count ? points[2 * p] : 0.0f;
      py[q] = p < count ? points[2 * p + 1] : 0.0f;
      best[q] = __int_as_float(0x7f800000);  // +inf: a point whose distances are all inf gets 0
      arg[q] = 0;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kTile2d) {
      const int size = static_cast<int>(K - k0 < kTile2d ? K - k0 : kTile2d);
      __syncthreads();  // the previous tile is no longer read
      for (int i = threadIdx.x; i < size; i += kThreads)
        tile[i] = make_float2(codebook[2 * (k0 + i)], codebook[2 * (k0 + i) + 1]);
      __syncthreads();
      for (int i = 0; i < size; ++i) {
        const float2 c = tile[i];
#pragma unroll
        for (int q = 0; q < kPointsPerThread; ++q) {
          const float dx = __fsub_rn(px[q], c.x), dy = __fsub_rn(py[q], c.y);
          const float d = __fadd_rn(__fmul_rn(dx, dx), __fmul_rn(dy, dy));
          if (d < best[q]) {
            best[q] = d;
            arg[q] = static_cast<int32_t>(k0 + i);
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kPointsPerThread; ++q) {
      const int64_t p = first + q * kThreads + threadIdx.x;
      if (p < count) out[p] = arg[q];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    nearest_1d_kernel(const float* __restrict__ values, int64_t count,
                      const float* __restrict__ codebook, int64_t K, int32_t* __restrict__ out) {
  __shared__ float tile[kTile1d];
  const int64_t span = int64_t{kThreads} * kPointsPerThread;
  for (int64_t first = blockIdx.x * span; first < count; first += int64_t{gridDim.x} * span) {
    float v[kPointsPerThread], best[kPointsPerThread];
    int32_t arg[kPointsPerThread];
#pragma unroll
    for (int q = 0; q < kPointsPerThread; ++q) {
      const int64_t p = first + q * kThreads + threadIdx.x;
      v[q] = p < count ? values[p] : 0.0f;
      best[q] = __int_as_float(0x7f800000);
      arg[q] = 0;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kTile1d) {
      const int size = static_cast<int>(K - k0 < kTile1d ? K - k0 : kTile1d);
      __syncthreads();
      for (int i = threadIdx.x; i < size; i += kThreads) tile[i] = codebook[k0 + i];
      __syncthreads();
      for (int i = 0; i < size; ++i) {
        const float c = tile[i];
#pragma unroll
        for (int q = 0; q < kPointsPerThread; ++q) {
          const float d = fabsf(__fsub_rn(v[q], c));
          if (d < best[q]) {
            best[q] = d;
            arg[q] = static_cast<int32_t>(k0 + i);
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kPointsPerThread; ++q) {
      const int64_t p = first + q * kThreads + threadIdx.x;
      if (p < count) out[p] = arg[q];
    }
  }
}

unsigned grid_for(int64_t count) {
  return capped_grid(ceil_div(count, int64_t{kThreads} * kPointsPerThread));
}

}  // namespace

void nearest_codeword_2d(const float* points, int64_t count, const float* codebook, int64_t K,
                         int32_t* out, void* stream) {
  if (count == 0 || K == 0) return;
  nearest_2d_kernel<<<grid_for(count), kThreads, 0, as_stream(stream)>>>(points, count, codebook,
                                                                          K, out);
}

void nearest_codeword_1d(const float* values, int64_t count, const float* codebook, int64_t K,
                         int32_t* out, void* stream) {
  if (count == 0 || K == 0) return;
  nearest_1d_kernel<<<grid_for(count), kThreads, 0, as_stream(stream)>>>(values, count, codebook,
                                                                          K, out);
}

}  // namespace qamw::cuda
