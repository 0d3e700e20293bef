// The emulator's own checks, each on a small kernel written for it: `self_test ok` must pass,
// and every other mode must fail with its own message (ctest matches it), so that a check that
// stopped working shows up.
//   ok               a block reduction with barriers and shuffles gives the right sum
//   race             the same reduction without its barrier: forward and reverse schedules differ
//   divergent        threads of a block wait at two different __syncthreads
//   exited           some threads return before a __syncthreads the others reach
//   shuffle-deadlock half a warp shuffles while the other half waits at __syncthreads
//   shared-limit     60 KiB of dynamic shared memory without cudaFuncSetAttribute
//   no-wait          a kernel launched overlapped (programmatic dependent launch) whose
//                    threads never call cudaGridDependencySynchronize
//   mma-exited       half a warp returns before the mma the other half calls
// `ok` also multiplies two small integer matrices with the emulated mma.m16n8k16, each lane's
// fragment elements placed by the PTX ISA's per-element formulas.
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda_runtime.h"

namespace {

constexpr int kThreads = 128;

// out[blockIdx.x] = sum of in over the block's 128 values: warp sums by shuffles, then thread 0
// adds the warps' sums from shared memory.
__global__ void block_sum(const float* in, float* out, bool with_barrier) {
  __shared__ float warp_sums[kThreads / 32];
  float v = in[blockIdx.x * kThreads + threadIdx.x];
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  if (with_barrier) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0;
    for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];
    out[blockIdx.x] = s;
  }
}

__global__ void divergent(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void exited(float* out) {
  if (threadIdx.x >= 64) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_deadlock(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void uses_shared(float* out) {
  float* s = qamw_emu::dynamic_shared<float>();
  s[threadIdx.x] = 1.0f;
  out[threadIdx.x] = s[threadIdx.x];
}

// out[i] = 2 i, after waiting for the kernels before it when `wait`.
__global__ void doubles(float* out, bool wait) {
  if (wait) cudaGridDependencySynchronize();
  cudaTriggerProgrammaticLaunchCompletion();
  out[threadIdx.x] = 2.0f * static_cast<float>(threadIdx.x);
}

void launch_overlapped_doubles(float* out, bool wait) {
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(1);
  config.blockDim = dim3(kThreads);
  config.attrs = &overlap;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, doubles, out, wait);
}

// D = A B (16 x 16 times 16 x 8, row-major; one warp). Element i of a lane's A fragment (4
// registers, 2 bf16 each) is A[g + 8 * ((i / 2) % 2)][2 t + i % 2 + 8 * (i / 4)], element i of
// B's (2 registers) is B[2 t + i % 2 + 8 * (i / 2)][g], element i of D's is
// D[g + 8 * (i / 2)][2 t + i % 2], for lane 4 g + t.
__global__ void mma_product(const float* a, const float* b, float* d) {
  const int g = threadIdx.x / 4, t = threadIdx.x % 4;
  const auto bf16 = [](float v) {  // exact for the small integers used here
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return u >> 16;
  };
  uint32_t fa[4] = {}, fb[2] = {};
  for (int i = 0; i < 8; ++i) {
    const int row = g + 8 * ((i / 2) % 2), col = 2 * t + i % 2 + 8 * (i / 4);
    fa[i / 2] |= bf16(a[row * 16 + col]) << 16 * (i % 2);
  }
  for (int i = 0; i < 4; ++i)
    fb[i / 2] |= bf16(b[(2 * t + i % 2 + 8 * (i / 2)) * 8 + g]) << 16 * (i % 2);
  float fd[4] = {};
  qamw_emu::warp_mma_bf16_16816(fd, fa, fb);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = fd[i];
}

__global__ void mma_exited(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  float d[4] = {};
  const uint32_t a[4] = {}, b[2] = {};
  qamw_emu::warp_mma_bf16_16816(d, a, b);
  out[threadIdx.x] = d[0];
}

std::vector<float> sums(const std::vector<float>& in, bool with_barrier,
                        qamw_emu::Schedule schedule) {
  qamw_emu::set_schedule(schedule);
  std::vector<float> out(in.size() / kThreads, -1.0f);
  qamw_emu::launch(block_sum, out.size(), kThreads)(in.data(), out.data(), with_barrier);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "ok";
  std::vector<float> in(3 * kThreads), out(kThreads, 0.0f);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 7);
  if (std::strcmp(mode, "ok") == 0 || std::strcmp(mode, "race") == 0) {
    const bool barrier = std::strcmp(mode, "ok") == 0;
    const std::vector<float> forward = sums(in, barrier, qamw_emu::Schedule::Forward);
    const std::vector<float> reverse = sums(in, barrier, qamw_emu::Schedule::Reverse);
    for (size_t b = 0; b < forward.size(); ++b) {
      float want = 0;
      for (int i = 0; i < kThreads; ++i) want += in[b * kThreads + i];
      if (forward[b] != want || reverse[b] != want) {
        std::printf("block %zu: sum %g (forward) and %g (reverse), want %g\n", b, forward[b],
                    reverse[b], want);
        return 1;
      }
    }
    launch_overlapped_doubles(out.data(), true);
    for (int i = 0; i < kThreads; ++i) {
      if (out[i] != 2.0f * static_cast<float>(i)) {
        std::printf("overlapped launch: out[%d] = %g\n", i, out[i]);
        return 1;
      }
    }
    std::vector<float> a(16 * 16), b(16 * 8), d(16 * 8, -1.0f);
    for (int i = 0; i < 16 * 16; ++i) a[i] = static_cast<float>(i % 13 - 6);
    for (int i = 0; i < 16 * 8; ++i) b[i] = static_cast<float>(i % 11 - 5);
    qamw_emu::launch(mma_product, 1, 32)(a.data(), b.data(), d.data());
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 8; ++c) {
        float want = 0;
        for (int k = 0; k < 16; ++k) want += a[r * 16 + k] * b[k * 8 + c];
        if (d[r * 8 + c] != want) {
          std::printf("mma: D[%d][%d] = %g, want %g\n", r, c, d[r * 8 + c], want);
          return 1;
        }
      }
    std::printf("block sums match in both schedules; an overlapped launch ran; mma multiplies\n");
    return 0;
  }
  if (std::strcmp(mode, "divergent") == 0) qamw_emu::launch(divergent, 1, kThreads)(out.data());
  else if (std::strcmp(mode, "exited") == 0) qamw_emu::launch(exited, 1, kThreads)(out.data());
  else if (std::strcmp(mode, "shuffle-deadlock") == 0)
    qamw_emu::launch(shuffle_deadlock, 1, kThreads)(out.data());
  else if (std::strcmp(mode, "shared-limit") == 0)
    qamw_emu::launch(uses_shared, 1, kThreads, 60 * 1024)(out.data());
  else if (std::strcmp(mode, "no-wait") == 0)
    launch_overlapped_doubles(out.data(), false);
  else if (std::strcmp(mode, "mma-exited") == 0)
    qamw_emu::launch(mma_exited, 1, 32)(out.data());
  else {
    std::printf("unknown mode %s\n", mode);
    return 2;
  }
  std::printf("mode %s ran without an error\n", mode);
  return 0;
}
