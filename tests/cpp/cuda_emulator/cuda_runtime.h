// A CPU emulation of the part of CUDA that csrc/cuda/*.cu uses, so that ctest runs the CUDA
// kernels on machines without a GPU and compares them with the CPU kernels.
//
// translate.py turns each .cu file into C++ (launches `k<<<grid, block, smem, s>>>(args)` become
// `qamw_emu::launch(k, grid, block, smem, s)(args)`, `extern __shared__` arrays become pointers
// to the launch's dynamic shared memory); this header stands in for <cuda_runtime.h>. Every CUDA
// thread is a fiber on one OS thread: blocks run one cluster after another (a block alone is a
// cluster of 1), and the threads of a cluster's blocks run in turn until each reaches a barrier
// (__syncthreads, sync_cluster, or the warp exchange of a shuffle).
// Static __shared__ arrays are function statics, which the block's threads share; as the blocks
// of a cluster run side by side, they would share them too: cluster launches must use dynamic
// shared memory only.
// Thread-block clusters (sm_90): cudaLaunchKernelEx with cudaLaunchAttributeClusterDimension
// runs clusters of clusterDim.x blocks along x; cluster_rank, cluster_size, sync_cluster (a
// barrier for every thread of the cluster) and cluster_shared (a peer block's dynamic shared
// memory, as the mapa instruction gives) stand in for the PTX a kernel uses.
//
// What it checks, beyond the results: a __syncthreads or cluster barrier that not every thread
// reaches, or that threads reach at different lines; a shuffle whose mask names lanes that
// exited or are elsewhere; a cluster that can never finish (deadlock); launch configurations a
// GPU would refuse (more than 1024 threads, dynamic shared memory over the 48 KiB default
// without cudaFuncSetAttribute, or over the device maximum, a cluster that is not 1 to 8 blocks
// along x or does not divide the grid); a thread of a kernel launched with programmatic
// dependent launch that exits without cudaGridDependencySynchronize; cluster_shared of a pointer
// outside the block's dynamic shared memory. Dynamic shared memory is a heap buffer of exactly
// the launch's size, filled with NaN bytes, so the sanitizer build catches accesses past it and
// reads of values never written show up as NaN; it is filled with NaN bytes again once all its
// block's threads have exited, so a peer that reads it after that (no final cluster barrier)
// reads NaN.
// Devices: kDevices of them, each with its own limits and its kernels' shared memory allowances;
// runtime_queries() counts the calls that ask about a kernel or set its attributes.
// Schedule::Reverse runs each step's blocks and threads in the opposite order: a missing barrier
// then gives a different result.
// Not emulated: timing, the memory model beyond barriers, warp-synchronous execution
// (only shuffles exchange values between lanes).
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// csrc/cuda/common.cuh hands the tensor-core instructions to the emulator.
#define QAMW_CUDA_EMULATOR 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __syncthreads() ::qamw_emu::sync_block(__FILE__, __LINE__)
#define __syncthreads_or(predicate) ::qamw_emu::sync_block_or((predicate), __FILE__, __LINE__)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// The running thread's coordinates: the scheduler sets them before it resumes a thread.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
constexpr int warpSize = 32;

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>(((uint64_t{hi} << 32) | lo) >> (shift & 31));
}
// Byte i of the result is byte (s >> 4 i) & 7 of the 8 bytes of (x, y), x first (no sign
// replication: the kernels never ask for it).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = uint64_t{y} << 32 | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned(bytes >> 8 * ((s >> 4 * i) & 7) & 0xff) << 8 * i;
  return r;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int __ffs(int v) { return __builtin_ffs(v); }

enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrComputeCapabilityMajor,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
struct cudaFuncAttributes {
  int ptxVersion, binaryVersion;
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaLaunchAttributeID {
  cudaLaunchAttributeClusterDimension = 4,
  cudaLaunchAttributeProgrammaticStreamSerialization = 6,
};
union cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
  int programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

namespace qamw_emu {

enum class Schedule { Forward, Reverse };

// The emulated device: an H100's limits with few SMs, so that persistent grids stride, but
// enough for a cluster of 4 CTAs of 512 threads. Its occupancy is that of the GEMV kernels on an
// H100, which registers (about 100 a thread, ptxas) hold to two CTAs of 256 threads an SM.
// kDevices of them, each with its own limits; cudaSetDevice picks the current one.
struct Device {
  int sms = 4;
  int max_threads_per_sm = 512;
  int max_blocks_per_sm = 32;
  int shared_per_sm = 228 * 1024;
  int shared_per_block_optin = 227 * 1024;
};
constexpr int kDevices = 2;
Device& device();  // the current one
int current_device();
void set_current_device(int dev);
// Calls so far that ask the runtime about a kernel or set its attributes (cudaFuncGetAttributes,
// cudaFuncSetAttribute, the occupancy calculator): what a test checks the launchers remember.
int64_t runtime_queries();
void count_runtime_query();
void set_schedule(Schedule s);

void sync_block(const char* file, int line);
// __syncthreads_or: the barrier, then whether any thread of the block passed a nonzero value.
int sync_block_or(int predicate, const char* file, int line);
// Exchanges `bytes` bytes of every lane of `mask` in the running thread's warp; returns those
// of lane `src` (or the caller's own when src is outside the warp).
void warp_exchange(unsigned mask, const void* value, void* result, size_t bytes, int src);
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA fragment layout) for the running
// thread's warp: every lane must call it; each gets its own d += A B once all have.
void warp_mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
void* dynamic_shared_memory();
// The running block's rank in its cluster (blockIdx.x % cluster_size()), and the cluster's
// blocks (1 for a launch without a cluster).
unsigned cluster_rank();
unsigned cluster_size();
// barrier.cluster.arrive + wait: every thread of every block of the cluster waits here.
void sync_cluster(const char* file, int line);
// mapa: where block `rank` of the cluster has what p points to in the running block's dynamic
// shared memory.
void* cluster_shared(void* p, unsigned rank);
// The blocks a cluster of the launch has (1 without cudaLaunchAttributeClusterDimension); fails
// on a cluster shape the emulation does not run.
unsigned cluster_blocks(const cudaLaunchConfig_t* config);
// Launches so far in clusters of `blocks` blocks (2 to 8), and in all: what a test checks a
// launcher chose.
int64_t cluster_launches(unsigned blocks);
int64_t launches();
void set_max_dynamic_shared(const void* kernel, int bytes);
int max_dynamic_shared(const void* kernel);
// Runs the grid in clusters of `cluster` blocks along x.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem,
              const std::function<void()>& thread_body, bool overlapped = false,
              unsigned cluster = 1);
// The running thread called cudaGridDependencySynchronize.
void grid_dependency_wait();

template <typename T>
T* dynamic_shared() { return static_cast<T*>(dynamic_shared_memory()); }

template <typename K>
const void* kernel_key(K kernel) { return reinterpret_cast<const void*>(kernel); }

// `launch(kernel, grid, block, smem, stream)(args...)`: runs the grid before returning.
template <typename K>
struct Launch {
  K kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args&&... args) const {
    run_grid(kernel_key(kernel), grid, block, smem, [&] { kernel(args...); });
  }
};
template <typename K>
Launch<K> launch(K kernel, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<K>{kernel, grid, block, smem};
}

}  // namespace qamw_emu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
  const int lane = static_cast<int>(threadIdx.x % warpSize);
  const int src = lane ^ lane_mask;
  T out;
  // A source past this lane's width segment returns the lane's own value, as on a GPU.
  qamw_emu::warp_exchange(mask, &v, &out, sizeof(T), src / width == lane / width ? src : lane);
  return out;
}

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = qamw_emu::current_device();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int dev) {
  qamw_emu::set_current_device(dev);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const qamw_emu::Device& d = qamw_emu::device();
  *value = attr == cudaDevAttrMultiProcessorCount          ? d.sms
           : attr == cudaDevAttrComputeCapabilityMajor ? 9
                                                        : d.shared_per_block_optin;
  return cudaSuccess;
}
// Every kernel is built from sm_90 code.
template <typename K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, K) {
  qamw_emu::count_runtime_query();
  *attributes = cudaFuncAttributes{90, 90};
  return cudaSuccess;
}
// Runs the grid at once, as launch() does; programmatic stream serialization only adds the
// check that every thread waits for the kernels before it. A cluster dimension runs the blocks
// of each cluster side by side.
template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...),
                               Args&&... args) {
  bool overlapped = false;
  for (unsigned i = 0; i < config->numAttrs; ++i)
    overlapped |= config->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization &&
                  config->attrs[i].val.programmaticStreamSerializationAllowed != 0;
  qamw_emu::run_grid(qamw_emu::kernel_key(kernel), config->gridDim, config->blockDim,
                     config->dynamicSmemBytes, [&] { kernel(Params(args)...); }, overlapped,
                     qamw_emu::cluster_blocks(config));
  return cudaSuccess;
}
inline void cudaGridDependencySynchronize() { qamw_emu::grid_dependency_wait(); }
inline void cudaTriggerProgrammaticLaunchCompletion() {}
template <typename K>
cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute, int bytes) {
  qamw_emu::count_runtime_query();
  qamw_emu::set_max_dynamic_shared(qamw_emu::kernel_key(kernel), bytes);
  return cudaSuccess;
}
// Limited by threads, blocks and shared memory (1 KiB reserved per block); registers unknown.
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K, int threads,
                                                          size_t smem) {
  qamw_emu::count_runtime_query();
  const qamw_emu::Device& d = qamw_emu::device();
  int n = d.max_threads_per_sm / threads;
  if (n > d.max_blocks_per_sm) n = d.max_blocks_per_sm;
  const int by_smem = static_cast<int>(d.shared_per_sm / (smem + 1024));
  *blocks = n < by_smem ? n : by_smem;
  return cudaSuccess;
}
// Clusters of the config's size resident at once: the device's blocks, as above, in whole
// clusters (one runtime query, the one above).
template <typename K>
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, K kernel,
                                           const cudaLaunchConfig_t* config) {
  const dim3 b = config->blockDim;
  int blocks_per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel,
                                                static_cast<int>(b.x * b.y * b.z),
                                                config->dynamicSmemBytes);
  *clusters = qamw_emu::device().sms * blocks_per_sm /
              static_cast<int>(qamw_emu::cluster_blocks(config));
  return cudaSuccess;
}
