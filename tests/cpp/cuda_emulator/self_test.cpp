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
//   cluster-exited   half the threads of one block of a cluster return before a cluster barrier
//                    the others reach
//   cluster-divergent the blocks of a cluster wait at two different cluster barriers
//   cluster-shared-outside cluster_shared of a pointer to global memory
// `ok` also multiplies two small integer matrices with the emulated mma.m16n8k16, each lane's
// fragment elements placed by the PTX ISA's per-element formulas; runs clusters of 4 blocks that
// add values from the shared memory of every block of their cluster, in both schedules; checks
// cudaOccupancyMaxActiveClusters, that each call counts as a runtime query and that a second
// device has its own limits; reads a peer's shared memory after the peer exited (NaN); and checks
// that __syncthreads_or answers whether any thread passed a nonzero value, twice in a row.
#include <cmath>
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

// out[threadIdx.x] = whether any thread is `one`, then whether any thread is past the block.
__global__ void any_thread(int one, float* out) {
  const int first = __syncthreads_or(static_cast<int>(threadIdx.x) == one);
  const int second = __syncthreads_or(static_cast<int>(threadIdx.x) >= kThreads);
  out[threadIdx.x] = static_cast<float>(first + 2 * second);
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

constexpr unsigned kClusterBlocks = 4;

// Each block puts its 128 values, blockIdx.x * 128 + i, in its dynamic shared memory; then
// thread t adds value (t + r) % 128 of each block r of the cluster. shape[blockIdx.x] is the
// block's rank + 100 times the cluster size.
__global__ void cluster_sums(float* out, unsigned* shape) {
  float* own = qamw_emu::dynamic_shared<float>();
  own[threadIdx.x] = static_cast<float>(blockIdx.x * kThreads + threadIdx.x);
  qamw_emu::sync_cluster(__FILE__, __LINE__);
  float sum = 0;
  for (unsigned r = 0; r < qamw_emu::cluster_size(); ++r)
    sum += static_cast<float*>(qamw_emu::cluster_shared(own, r))[(threadIdx.x + r) % kThreads];
  out[blockIdx.x * kThreads + threadIdx.x] = sum;
  if (threadIdx.x == 0)
    shape[blockIdx.x] = qamw_emu::cluster_rank() + 100 * qamw_emu::cluster_size();
  qamw_emu::sync_cluster(__FILE__, __LINE__);  // the peers read this block's memory until here
}

// Rank 0 exits after the first cluster barrier, without the second one that rank 1 needs to
// read its memory. Rank 1's __syncthreads takes it one scheduling round, in which rank 0 runs
// to its exit in either schedule: rank 1 then reads the memory of an exited block.
__global__ void reads_exited_peer(float* out) {
  float* own = qamw_emu::dynamic_shared<float>();
  own[threadIdx.x] = 1.0f;
  qamw_emu::sync_cluster(__FILE__, __LINE__);
  if (qamw_emu::cluster_rank() == 0) return;
  __syncthreads();
  out[threadIdx.x] = static_cast<float*>(qamw_emu::cluster_shared(own, 0))[threadIdx.x];
}

__global__ void cluster_exited(float* out) {
  if (qamw_emu::cluster_rank() == 1 && threadIdx.x >= 64) return;
  qamw_emu::sync_cluster(__FILE__, __LINE__);
  out[threadIdx.x] = 1.0f;
}

__global__ void cluster_divergent(float* out) {
  if (qamw_emu::cluster_rank() == 0) {
    qamw_emu::sync_cluster(__FILE__, __LINE__);
  } else {
    qamw_emu::sync_cluster(__FILE__, __LINE__);
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void cluster_shared_outside(float* out) {
  out[threadIdx.x] = *static_cast<float*>(qamw_emu::cluster_shared(out, 1));
}

// A launch of `grid` blocks of `threads` threads in clusters of `cluster`, with a float of
// dynamic shared memory a thread; `dims` holds its cluster attribute.
cudaLaunchConfig_t cluster_config(unsigned grid, unsigned threads, unsigned cluster,
                                  cudaLaunchAttribute& dims) {
  dims = cudaLaunchAttribute{};
  dims.id = cudaLaunchAttributeClusterDimension;
  dims.val.clusterDim.x = cluster;
  dims.val.clusterDim.y = dims.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = threads * sizeof(float);
  config.attrs = &dims;
  config.numAttrs = 1;
  return config;
}

template <typename... Params, typename... Args>
void launch_clusters(void (*kernel)(Params...), unsigned grid, unsigned cluster, Args... args) {
  cudaLaunchAttribute dims;
  const cudaLaunchConfig_t config = cluster_config(grid, kThreads, cluster, dims);
  cudaLaunchKernelEx(&config, kernel, args...);
}

// Whether cluster_sums over 8 blocks gives every sum and shape in the given schedule.
bool cluster_sums_match(qamw_emu::Schedule schedule) {
  qamw_emu::set_schedule(schedule);
  constexpr unsigned kBlocks = 2 * kClusterBlocks;
  std::vector<float> out(kBlocks * kThreads, -1.0f);
  std::vector<unsigned> shape(kBlocks, 0);
  launch_clusters(cluster_sums, kBlocks, kClusterBlocks, out.data(), shape.data());
  for (unsigned b = 0; b < kBlocks; ++b) {
    if (shape[b] != b % kClusterBlocks + 100 * kClusterBlocks) {
      std::printf("cluster: block %u has rank + 100 size %u\n", b, shape[b]);
      return false;
    }
    const unsigned first = b - b % kClusterBlocks;
    for (unsigned t = 0; t < kThreads; ++t) {
      float want = 0;
      for (unsigned r = 0; r < kClusterBlocks; ++r)
        want += static_cast<float>((first + r) * kThreads + (t + r) % kThreads);
      if (out[b * kThreads + t] != want) {
        std::printf("cluster: block %u thread %u sums %g, want %g\n", b, t,
                    out[b * kThreads + t], want);
        return false;
      }
    }
  }
  return true;
}

// Whether a read of an exited peer's shared memory gives NaN in the given schedule.
bool exited_peer_reads_nan(qamw_emu::Schedule schedule) {
  qamw_emu::set_schedule(schedule);
  std::vector<float> out(kThreads, 0.0f);
  launch_clusters(reads_exited_peer, 2, 2, out.data());
  for (float v : out)
    if (!std::isnan(v)) return false;
  return true;
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
    for (const int one : {-1, 0, kThreads - 1}) {
      qamw_emu::launch(any_thread, 1, kThreads)(one, out.data());
      for (int i = 0; i < kThreads; ++i) {
        if (out[i] != (one >= 0 ? 1.0f : 0.0f)) {
          std::printf("__syncthreads_or: thread %d got %g with thread %d true\n", i, out[i], one);
          return 1;
        }
      }
    }
    if (!cluster_sums_match(qamw_emu::Schedule::Forward) ||
        !cluster_sums_match(qamw_emu::Schedule::Reverse))
      return 1;
    for (const qamw_emu::Schedule s : {qamw_emu::Schedule::Forward, qamw_emu::Schedule::Reverse}) {
      if (!exited_peer_reads_nan(s)) {
        std::printf("cluster: a read of an exited peer's shared memory is not NaN\n");
        return 1;
      }
    }
    // 4 SMs hold 4 clusters of 4 blocks of 128 threads (512 threads an SM), none of 1024.
    cudaLaunchAttribute dims;
    int small = -1, large = -1;
    const int64_t queries = qamw_emu::runtime_queries();
    cudaLaunchConfig_t config = cluster_config(8, kThreads, kClusterBlocks, dims);
    cudaOccupancyMaxActiveClusters(&small, cluster_sums, &config);
    config = cluster_config(8, 1024, kClusterBlocks, dims);
    cudaOccupancyMaxActiveClusters(&large, cluster_sums, &config);
    if (small != 4 || large != 0) {
      std::printf("cluster occupancy: %d clusters of 128 threads, %d of 1024; want 4 and 0\n",
                  small, large);
      return 1;
    }
    if (qamw_emu::runtime_queries() != queries + 2) {
      std::printf("two occupancy queries counted as %lld\n",
                  static_cast<long long>(qamw_emu::runtime_queries() - queries));
      return 1;
    }
    // Each device has its own limits and its own kernel attributes.
    cudaFuncSetAttribute(cluster_sums, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
    cudaSetDevice(1);
    qamw_emu::device().sms = 2;
    config = cluster_config(8, kThreads, kClusterBlocks, dims);
    cudaOccupancyMaxActiveClusters(&small, cluster_sums, &config);
    const int allowed = qamw_emu::max_dynamic_shared(qamw_emu::kernel_key(cluster_sums));
    cudaSetDevice(0);
    if (small != 2 || allowed != 48 * 1024) {
      std::printf("device 1: %d clusters of 128 threads (want 2), %d bytes of shared memory "
                  "allowed (want 49152)\n", small, allowed);
      return 1;
    }
    std::printf("block sums match in both schedules; an overlapped launch ran; mma multiplies; "
                "clusters share shared memory\n");
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
  else if (std::strcmp(mode, "cluster-exited") == 0)
    launch_clusters(cluster_exited, 2, 2, out.data());
  else if (std::strcmp(mode, "cluster-divergent") == 0)
    launch_clusters(cluster_divergent, 2, 2, out.data());
  else if (std::strcmp(mode, "cluster-shared-outside") == 0)
    launch_clusters(cluster_shared_outside, 2, 2, out.data());
  else {
    std::printf("unknown mode %s\n", mode);
    return 2;
  }
  std::printf("mode %s ran without an error\n", mode);
  return 0;
}
