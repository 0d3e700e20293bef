// Pieces shared by the CUDA kernels: activation dtypes, compile-time dispatch, launch helpers.
// Only CUDA headers here: torch stays in the .cpp wrappers so that .cu files compile fast.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "../kernels.h"

namespace qamw::cuda {

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A compile-time int, so that generic lambdas can turn a runtime value into a template argument.
template <int V>
struct IntC {
  static constexpr int value = V;
};

// Calls f with a null pointer of the device type of `dtype` (float, __half, __nv_bfloat16).
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: f(static_cast<float*>(nullptr)); break;
    case DType::F16: f(static_cast<__half*>(nullptr)); break;
    case DType::BF16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

// Calls f with IntC<bits> for bits in 1..16 (callers have checked the range).
template <typename F>
void dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 1: f(IntC<1>{}); break;
    case 2: f(IntC<2>{}); break;
    case 3: f(IntC<3>{}); break;
    case 4: f(IntC<4>{}); break;
    case 5: f(IntC<5>{}); break;
    case 6: f(IntC<6>{}); break;
    case 7: f(IntC<7>{}); break;
    case 8: f(IntC<8>{}); break;
    case 9: f(IntC<9>{}); break;
    case 10: f(IntC<10>{}); break;
    case 11: f(IntC<11>{}); break;
    case 12: f(IntC<12>{}); break;
    case 13: f(IntC<13>{}); break;
    case 14: f(IntC<14>{}); break;
    case 15: f(IntC<15>{}); break;
    default: f(IntC<16>{}); break;
  }
}

// Calls f with IntC<NB>, NB the smallest of 1, 2, 4, 8, 16 holding `batch` (<= 16) rows:
// accumulators must live in registers, so the batch is a template argument.
template <typename F>
void dispatch_batch(int64_t batch, F&& f) {
  if (batch <= 1) f(IntC<1>{});
  else if (batch <= 2) f(IntC<2>{});
  else if (batch <= 4) f(IntC<4>{});
  else if (batch <= 8) f(IntC<8>{});
  else f(IntC<16>{});
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Element i of an activation of runtime dtype, as a float, and the converse store.
__device__ __forceinline__ float load_as_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F16: return to_float(static_cast<const __half*>(p)[i]);
    case DType::BF16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::F16: static_cast<__half*>(p)[i] = from_float<__half>(v); break;
    case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = from_float<__nv_bfloat16>(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// Loads N consecutive values as floats. With `vec` the address must be aligned to
// N * sizeof(T) (or 16 bytes when that is larger): whole 16-byte vectors are used then.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&v)[N], bool vec) {
  constexpr int per16 = 16 / sizeof(T);
  if constexpr (N % per16 == 0) {
    if (vec) {
#pragma unroll
      for (int q = 0; q < N / per16; ++q) {
        const uint4 raw = reinterpret_cast<const uint4*>(p)[q];
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < per16; ++i) v[q * per16 + i] = to_float(e[i]);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = to_float(p[i]);
}

// Stores N floats as N consecutive values of T; same alignment rule as load_floats.
template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&v)[N], bool vec) {
  constexpr int per16 = 16 / sizeof(T);
  if constexpr (N % per16 == 0) {
    if (vec) {
#pragma unroll
      for (int q = 0; q < N / per16; ++q) {
        uint4 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int i = 0; i < per16; ++i) e[i] = from_float<T>(v[q * per16 + i]);
        reinterpret_cast<uint4*>(p)[q] = raw;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) p[i] = from_float<T>(v[i]);
}

// Whether the environment variable `name` is set to `value`: the run-time switches that
// benchmarks flip (QAMW_PDL, QAMW_GEMV_MMA, ...), read at each launch.
inline bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, value) == 0;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// CTAs for a grid-stride kernel that wants `ctas`: at most 2^20, the kernel strides over the rest.
inline unsigned capped_grid(int64_t ctas) {
  return static_cast<unsigned>(ctas < (1 << 20) ? ctas : (1 << 20));
}

// The device's shared memory per block, once a kernel opts in with cudaFuncSetAttribute.
inline int shared_per_block_optin() {
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return optin;
}

// Shared memory per block that still lets two CTAs share an SM (16 warps of 256-thread CTAs
// to hide latency, not 8): an SM holds the opt-in per block plus 1 KiB per CTA.
inline int64_t shared_per_block_two_an_sm() {
  return (int64_t{shared_per_block_optin()} + 1024) / 2 - 1024;
}

// What the runtime says of a kernel on a device, asked once a process and kept: the occupancy
// calculator and cudaFuncGetAttributes cost microseconds a call, and a batch-1 GEMV launched
// eagerly (~10 us on an H100) would otherwise ask several at every launch (the launcher's plan,
// the persistent grid, PDL). None of it changes while the process runs.
enum class LaunchFact { kPtxVersion, kResidentClusters, kSharedAllowed };
struct LaunchFacts {
  // fact, device, kernel, then the launch shape: threads, shared memory bytes, cluster
  using Key = std::tuple<LaunchFact, int, const void*, int, size_t, int>;
  std::mutex mutex;
  std::map<Key, int64_t> values;
};
inline LaunchFacts& launch_facts() {
  static LaunchFacts facts;
  return facts;
}
template <typename K>
LaunchFacts::Key launch_fact_key(LaunchFact fact, K kernel, int threads = 0, size_t smem = 0,
                                 int cluster = 0) {
  int dev = 0;
  cudaGetDevice(&dev);
  return {fact, dev, reinterpret_cast<const void*>(kernel), threads, smem, cluster};
}

// ask() for `key`, on the first call with that key only.
template <typename Ask>
int64_t remembered(const LaunchFacts::Key& key, Ask&& ask) {
  LaunchFacts& facts = launch_facts();
  {
    std::lock_guard<std::mutex> lock(facts.mutex);
    const auto it = facts.values.find(key);
    if (it != facts.values.end()) return it->second;
  }
  const int64_t value = ask();  // unlocked: two threads may both ask, and get the same answer
  std::lock_guard<std::mutex> lock(facts.mutex);
  return facts.values.emplace(key, value).first->second;
}

// Shared memory a kernel may use, raising the 48 KiB default when needed; false when the
// device has less. The limit is raised once to the most bytes asked so far on the device, so
// later launches asking as much or less leave the runtime alone.
template <typename K>
bool allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return true;
  if (bytes > static_cast<size_t>(shared_per_block_optin())) return false;
  const LaunchFacts::Key key = launch_fact_key(LaunchFact::kSharedAllowed, kernel);
  LaunchFacts& facts = launch_facts();
  std::lock_guard<std::mutex> lock(facts.mutex);
  int64_t& allowed = facts.values[key];
  if (allowed < static_cast<int64_t>(bytes) &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes)) == cudaSuccess)
    allowed = static_cast<int64_t>(bytes);
  return allowed >= static_cast<int64_t>(bytes);
}

constexpr int64_t kCodebookCopiesBytes = 128 * 1024;

// Copies of a codebook (or table) of 2^bits entries in shared memory: entry e of copy r at
// e * copies + r, and lane l reads copy l % copies (LaneCopy), so the data-dependent lookups
// spread over the banks (one copy: ~3 times the wavefronts). Shared memory serves a wavefront
// of 128 bytes: 32 lanes of 4-byte codewords, 16 of 8-byte ones, so 128 / entry_bytes copies
// give every lane of a wavefront its own banks. The copies take at most 128 KiB and `budget`
// (the launcher's copies_beside: on an H100 at batch 1 with n = 4096, half2 codewords get 32
// copies up to 9 bits per pair, 16 at 10, 8 at 11 and 4 at 12), where lanes l and l + copies
// may share banks. Returns 0 when not even one copy fits in `budget` bytes.
inline int codebook_copies(int bits, int entry_bytes, int64_t budget) {
  const int64_t limit = budget < kCodebookCopiesBytes ? budget : kCodebookCopiesBytes;
  int copies = 128 / entry_bytes;
  while (copies > 0 && (int64_t{entry_bytes} * copies << bits) > limit) copies /= 2;
  return copies;
}

// The calling lane's copy of a table staged as 2^copies_log2 copies (codebook_copies' layout):
// entry e at its first entry plus e times the bytes between a copy's entries. A multiply, not a
// shift by the runtime copy count: with the add, an entry's address is one IMAD.
template <typename Entry>
struct LaneCopy {
  const unsigned char* first;
  uint32_t stride;
  __device__ LaneCopy(const Entry* table, int copies_log2)
      : first(reinterpret_cast<const unsigned char*>(
            table + (threadIdx.x % 32 & ((1 << copies_log2) - 1)))),
        stride(sizeof(Entry) << copies_log2) {}
  __device__ __forceinline__ Entry operator[](uint32_t e) const {
    return *reinterpret_cast<const Entry*>(first + e * stride);
  }
};

// Rows a GEMV lane decodes side by side: two at batch 1, so that each activation value read
// from shared memory serves two rows' codes (shared loads per code bound both GEMVs); larger
// batches have the registers for one row.
constexpr int rows_per_lane(int64_t batch) { return batch == 1 ? 2 : 1; }

// Lanes that share a GEMV row (or R rows): a power of two, no more than the row's `units` (the
// pieces a lane decodes at a time), and at most 32 when the kernel serves batch 1 (twice the
// CTAs of 16, for the 4096-row layers) or 16 for larger batches, where the two rows of a warp
// then read the same activation values, which shared memory or L1 broadcasts.
inline int gemv_group_lanes(int64_t units, int64_t kernel_batch) {
  const int most = kernel_batch == 1 ? 32 : 16;
  int lanes = 1;
  while (lanes < most && lanes < units) lanes *= 2;
  return lanes;
}

// Rows one step of a GEMV CTA of `threads` covers, when groups of G lanes share R rows.
constexpr int64_t gemv_rows_per_cta(int threads, int G, int R) {
  return int64_t{threads / 32} * R * (32 / G);
}

// SMs of the current device.
inline int sm_count() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

// The launch attribute for thread-block clusters of `cluster` CTAs along x.
inline cudaLaunchAttribute cluster_dimension(int cluster) {
  cudaLaunchAttribute dims{};
  dims.id = cudaLaunchAttributeClusterDimension;
  dims.val.clusterDim.x = static_cast<unsigned>(cluster);
  dims.val.clusterDim.y = dims.val.clusterDim.z = 1;
  return dims;
}

// Clusters of `cluster` CTAs (of `threads` threads and smem bytes, which the kernel must be
// allowed) the device holds at once: CTAs an SM times the SMs when cluster is 1; 0 where none
// fits.
template <typename K>
int64_t resident_clusters(K kernel, int threads, size_t smem, int cluster) {
  const auto key = launch_fact_key(LaunchFact::kResidentClusters, kernel, threads, smem, cluster);
  return remembered(key, [&]() -> int64_t {
    int resident = 0;
    if (cluster == 1) {
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, smem);
      return int64_t{resident} * sm_count();
    }
    cudaLaunchAttribute dims = cluster_dimension(cluster);
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(cluster));
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.dynamicSmemBytes = smem;
    config.attrs = &dims;
    config.numAttrs = 1;
    if (cudaOccupancyMaxActiveClusters(&resident, kernel, &config) != cudaSuccess) resident = 0;
    return resident;
  });
}

// Waves of a persistent GEMV grid over the rows of `siblings` (m rows in all) in units of
// rows_per_unit, `resident` units at once: each sibling's rows take whole units.
inline int64_t gemv_waves(const Siblings& siblings, int64_t m, int64_t rows_per_unit,
                          int64_t resident) {
  int64_t units = 0;
  for (int s = 0; s < siblings.count; ++s)
    units += ceil_div((siblings.count == 1 ? m : siblings.end[s]) - siblings.begin(s),
                      rows_per_unit);
  return ceil_div(units, resident > 0 ? resident : 1);
}

// Units (clusters of `cluster` CTAs) of a persistent GEMV grid over `rows` rows: one per
// rows_per_unit, but no more than the device holds at once (one wave; the units stride over the
// rest).
template <typename K>
unsigned persistent_grid(K kernel, int threads, size_t smem, int64_t rows, int64_t rows_per_unit,
                         int cluster = 1) {
  const int64_t wanted = ceil_div(rows, rows_per_unit);
  int64_t resident = resident_clusters(kernel, threads, smem, cluster);
  if (resident < 1) resident = cluster == 1 ? sm_count() : 1;
  return static_cast<unsigned>(wanted < resident ? wanted : resident);
}

// The CTAs of a persistent GEMV grid shared among the siblings of a fused weight (kernels.h) in
// proportion to their rows, at least one each: a CTA serves one sibling's rows, so it stages
// the activation once, with that sibling's channel scale. A plain weight is one sibling.
struct CtaSplit {
  int count;
  int64_t row_end[kMaxSiblings];  // cumulative, as Siblings::end
  int cta_end[kMaxSiblings];      // cumulative CTAs (or units of them, cta_rows)
};

// The split of `grid` CTAs (a persistent grid for all m rows), and in `grid` the CTAs it takes.
inline CtaSplit split_ctas(const Siblings& siblings, int64_t m, int64_t rows_per_cta,
                           unsigned& grid) {
  CtaSplit c{};
  c.count = siblings.count;
  if (siblings.count == 1) {
    c.row_end[0] = m;
    c.cta_end[0] = static_cast<int>(grid);
    return c;
  }
  int total = 0;
  for (int s = 0; s < siblings.count; ++s) {
    const int64_t rows = siblings.end[s] - siblings.begin(s);
    const int64_t share = (int64_t{grid} * rows + m / 2) / m;
    const int64_t tiles = ceil_div(rows, rows_per_cta);
    total += static_cast<int>(share < 1 ? 1 : share > tiles ? tiles : share);
    c.row_end[s] = siblings.end[s];
    c.cta_end[s] = total;
  }
  grid = static_cast<unsigned>(total);
  return c;
}

// This CTA's sibling and rows: first, first + stride, ... below end. Fixed indices only, so the
// split stays in the parameter space.
struct CtaRows {
  int sibling;
  int64_t first, end, stride;
};
// A cluster of `cluster` CTAs is one unit of the split: its CTAs share rows_per_unit rows.
__device__ __forceinline__ CtaRows cta_rows(const CtaSplit& c, int64_t rows_per_unit,
                                            int cluster = 1) {
  const int unit = static_cast<int>(blockIdx.x) / cluster;
  int s = 0, cta0 = 0, cta1 = c.cta_end[0];
  int64_t row0 = 0, row1 = c.row_end[0];
#pragma unroll
  for (int k = 1; k < kMaxSiblings; ++k) {
    if (k < c.count && unit >= c.cta_end[k - 1]) {
      s = k;
      cta0 = c.cta_end[k - 1];
      cta1 = c.cta_end[k];
      row0 = c.row_end[k - 1];
      row1 = c.row_end[k];
    }
  }
  return {s, row0 + int64_t{unit - cta0} * rows_per_unit, row1,
          int64_t{cta1 - cta0} * rows_per_unit};
}

// Asks L2 for the 128-byte line holding p ahead of the load that needs it: the DRAM latency then
// overlaps other work without a register held. (Off the GPU it reads the byte, so that the
// emulated tests' address checks see the address.)
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifdef __CUDA_ARCH__
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
  (void)*static_cast<const volatile char*>(p);
#endif
}

// Programmatic dependent launch (sm_90 and later). A kernel started by launch_overlapped may be
// scheduled while the kernel before it in the stream finishes, so that its launch and its
// first weight prefetches overlap that kernel's tail: a decode step is a chain of short
// kernels (benchmarks/NOTES.md, GPU v6). Before wait_for_prior_kernels() such a kernel only
// computes indices and prefetches its weights into L2, which changes no result; every read or
// write of memory that earlier kernels may use comes after it. let_next_kernel_launch() lets a
// kernel launched the same way after this one be scheduled early; it still waits for this one.
__device__ __forceinline__ void wait_for_prior_kernels() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();
#endif
}
__device__ __forceinline__ void let_next_kernel_launch() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  cudaTriggerProgrammaticLaunchCompletion();
#endif
}

// Thread-block clusters (sm_90 and later; launch_clustered): the CTA's rank in its cluster, a
// barrier for every thread of the cluster (cluster_sync: the writes to shared memory before it
// are visible to every CTA of the cluster after it), and the address in CTA `rank`'s shared
// memory of what p points to in this CTA's (distributed shared memory: a generic address that
// plain loads read). A CTA must not exit while a peer may still read its shared memory. The
// CUDA emulator runs the CTAs of a cluster side by side.
__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
#elif defined(QAMW_CUDA_EMULATOR)
  return qamw_emu::cluster_rank();
#else
  return 0;
#endif
}
#if defined(QAMW_CUDA_EMULATOR)
// The emulator checks that the threads of a cluster wait at the same call.
inline void cluster_sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  qamw_emu::sync_cluster(file, line);
}
#else
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
#endif
template <typename T>
__device__ __forceinline__ T* cluster_shared(T* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint64_t peer;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(peer) : "l"(p), "r"(rank));
  return reinterpret_cast<T*>(peer);
#elif defined(__CUDA_ARCH__)
  __trap();
  return p;
#elif defined(QAMW_CUDA_EMULATOR)
  return static_cast<T*>(qamw_emu::cluster_shared(p, rank));
#else
  return p;
#endif
}

// Whether the device is sm_<arch> or later and `kernel` was compiled from code for it (arch as
// 90 for sm_90): what the device-specific instructions a kernel uses need.
template <typename K>
bool runs_as_sm(K kernel, int arch) {
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (major < arch / 10) return false;
  return remembered(launch_fact_key(LaunchFact::kPtxVersion, kernel), [&]() -> int64_t {
           cudaFuncAttributes attributes{};
           return cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess
                      ? attributes.ptxVersion : 0;
         }) >= arch;
}

// Whether `kernel` may be launched overlapped: the device is sm_90 or later, the kernel was
// compiled for it (from sm_90 code: older code has no wait), and QAMW_PDL is not 0. QAMW_PDL is
// read at each launch, so that a CUDA graph keeps the choice it was captured with.
template <typename K>
bool overlap_allowed(K kernel) {
  return !env_is("QAMW_PDL", "0") && runs_as_sm(kernel, 90);
}

// kernel<<<grid, threads, smem, stream>>>(args...) in clusters of `cluster` CTAs along x (1:
// none; sm_90 and later, which the caller checks), overlapped with the kernel before it where
// overlap_allowed. The kernel calls wait_for_prior_kernels() as described above.
template <typename... Params, typename... Args>
void launch_clustered(void (*kernel)(Params...), int cluster, dim3 grid, int threads,
                      size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attrs[2]{};
  unsigned count = 0;
  if (overlap_allowed(kernel)) {
    attrs[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) attrs[count++] = cluster_dimension(cluster);
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = count;
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// kernel<<<grid, threads, smem, stream>>>(args...), overlapped as launch_clustered says.
template <typename... Params, typename... Args>
void launch_overlapped(void (*kernel)(Params...), dim3 grid, int threads, size_t smem,
                       cudaStream_t stream, Args&&... args) {
  launch_clustered(kernel, 1, grid, threads, smem, stream, std::forward<Args>(args)...);
}

// Launches a GEMV kernel on a persistent grid over the m rows of `siblings`: its shared memory
// allowed, the grid sized by occupancy, the CTAs split among the siblings (p.split) in units of
// `cluster` CTAs (a thread-block cluster when more than 1) that share rows_per_unit rows,
// overlapped with the kernel before it.
template <typename Params>
void launch_gemv(void (*kernel)(Params), int threads, size_t smem, const Siblings& siblings,
                 int64_t m, int64_t rows_per_unit, cudaStream_t stream, Params& p,
                 int cluster = 1) {
  allow_smem(kernel, smem);
  unsigned units = persistent_grid(kernel, threads, smem, m, rows_per_unit, cluster);
  p.split = split_ctas(siblings, m, rows_per_unit, units);
  launch_clustered(kernel, cluster, dim3(units * cluster), threads, smem, stream, p);
}

// Code k of a packed row of `bits`-bit codes (kernels.h layout). A code straddles two words
// only when it does not end in the first, so the second word exists whenever it is read.
__device__ __forceinline__ uint32_t packed_code(const uint32_t* row, int64_t k, int bits) {
  const int64_t bit = k * bits, word = bit >> 5;
  const int sh = static_cast<int>(bit & 31);
  const uint32_t hi = sh + bits > 32 ? row[word + 1] : 0u;
  return __funnelshift_r(row[word], hi, sh) & ((1u << bits) - 1u);
}

// In-register Walsh-Hadamard butterflies over R index bits of each of the E / 2^R columns of v
// (slot = column * 2^R + i), unnormalised; only over the lowest `bits` of them when fewer.
template <int R, int E>
__device__ __forceinline__ void butterflies(float (&v)[E], int bits = R) {
  constexpr int S = 1 << R;
#pragma unroll
  for (int c = 0; c < E / S; ++c) {
#pragma unroll
    for (int h = 1; h < S; h *= 2) {
#pragma unroll
      for (int i = 0; i < S; ++i) {
        if ((i & h) == 0 && h < (1 << bits)) {
          const float a = v[c * S + i], b = v[c * S + i + h];
          v[c * S + i] = a + b;
          v[c * S + i + h] = a - b;
        }
      }
    }
  }
}

// Applies the unnormalised Walsh-Hadamard butterflies of index bits 0 .. transform_bits - 1
// (<= 5) to the pieces of 8 consecutive values that the lanes of a warp hold, lane l piece l
// of 32 consecutive ones (bits 3-4 through shuffles: every lane of the warp calls this, and the
// pieces of an idle lane, dst == nullptr, are idle too), then stores each piece at its dst
// (8-byte aligned). The 4 pairs go in an order rotated by lane / 4: lanes 8 floats apart then
// write 16 different bank pairs per half-warp, where the plain order conflicts 4 ways. Done
// here, those bits cost no shared-memory passes, and they are the passes that would conflict
// (a thread's values 1-16 apart).
__device__ __forceinline__ void transform_and_store_piece(float (&v)[8], int transform_bits,
                                                          float* dst) {
  const int lane = threadIdx.x % 32;
  butterflies<3>(v, transform_bits < 3 ? transform_bits : 3);
#pragma unroll
  for (int bit = 3; bit < 5; ++bit) {
    if (bit < transform_bits) {
      const int m = 1 << (bit - 3);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float other = __shfl_xor_sync(0xffffffffu, v[i], m);
        v[i] = (lane & m) ? other - v[i] : v[i] + other;
      }
    }
  }
  if (dst == nullptr) return;
  float2* out = reinterpret_cast<float2*>(dst);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int k = (i + (lane >> 2)) & 3;
    out[k] = k == 0   ? make_float2(v[0], v[1])
             : k == 1 ? make_float2(v[2], v[3])
             : k == 2 ? make_float2(v[4], v[5])
                      : make_float2(v[6], v[7]);
  }
}

// Stages `batch` activation rows of n values into shared memory as floats: value j of row b,
// divided by channel_scale[j] and times signs[j] and `scale`, goes to
// dst[b * row_stride + index(j)]; index(j) .. index(j) + 7 must be consecutive and 8-byte
// aligned for every j that is a multiple of 8. With `vec` (x and channel_scale 16-byte
// aligned, signs 8-byte aligned, n a multiple of 8) a thread loads several pieces of 8 values
// with 16-byte loads before it stores any: their loads are in flight together. Otherwise, and
// for the last n % 8 values, one value at a time.
//
// On the vector path the staged rows also get the Walsh-Hadamard butterflies of their low
// `transform_bits` index bits (transform_and_store_piece; more than 3 needs n a multiple of
// 32). Returns the bits transformed: transform_bits on the vector path, else 0.
template <typename T, typename Index>
__device__ __forceinline__ int stage_activation(const T* __restrict__ x, int n, int batch,
                                                const float* __restrict__ channel_scale,
                                                const int8_t* __restrict__ signs, float scale,
                                                bool vec, float* dst, int row_stride,
                                                Index index, int transform_bits = 0) {
  // Four pieces of fp16/bf16 or two of fp32 (both 64 bytes of x): more would raise the
  // GEMV kernels' register count above what their main loops need.
  constexpr int kVecs = sizeof(T) / 2, kUnroll = 4 / kVecs;  // kVecs: 16-byte vectors a piece
  const int pieces = vec ? n / 8 : 0, total = batch * pieces;
  const int lane = threadIdx.x % 32;
  // Warp-uniform bounds (blockDim.x is a multiple of 32): every lane reaches the shuffles.
  for (int w0 = threadIdx.x - lane; w0 < total; w0 += kUnroll * blockDim.x) {
    uint4 raw[kUnroll][kVecs];
    float4 cs[kUnroll][2];
    uint2 sg[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = w0 + lane + u * blockDim.x;
      if (t < total) {
        const int b = t / pieces, j = 8 * (t - b * pieces);
        const uint4* xv = reinterpret_cast<const uint4*>(x + int64_t{b} * n + j);
#pragma unroll
        for (int q = 0; q < kVecs; ++q) raw[u][q] = xv[q];
        if (channel_scale) {
          cs[u][0] = reinterpret_cast<const float4*>(channel_scale + j)[0];
          cs[u][1] = reinterpret_cast<const float4*>(channel_scale + j)[1];
        }
        if (signs) sg[u] = *reinterpret_cast<const uint2*>(signs + j);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = w0 + lane + u * blockDim.x;
      if (w0 + u * blockDim.x >= total) break;  // warp-uniform
      float v[8] = {};
      float* piece_dst = nullptr;  // an idle lane
      if (t < total) {
        const int b = t / pieces, j = 8 * (t - b * pieces);
        const T* e = reinterpret_cast<const T*>(raw[u]);
        const float* c = reinterpret_cast<const float*>(cs[u]);
        const int8_t* s = reinterpret_cast<const int8_t*>(&sg[u]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          v[i] = to_float(e[i]);
          if (channel_scale) v[i] /= c[i];
          if (signs) v[i] *= static_cast<float>(s[i]);
          v[i] *= scale;
        }
        piece_dst = dst + b * row_stride + index(j);
      }
      transform_and_store_piece(v, transform_bits, piece_dst);
    }
  }
  const int rest = n - 8 * pieces;
  for (int t = threadIdx.x; t < batch * rest; t += blockDim.x) {
    const int b = t / rest, j = 8 * pieces + (t - b * rest);
    float v = to_float(x[int64_t{b} * n + j]);
    if (channel_scale) v /= channel_scale[j];
    if (signs) v *= static_cast<float>(signs[j]);
    dst[b * row_stride + index(j)] = v * scale;
  }
  return vec ? transform_bits : 0;
}

// The rows of a lane in a persistent GEMV grid: groups of G lanes (a power of two) share R
// consecutive rows, so a CTA covers R * (32 / G) rows a warp per step (and strides by the
// rows of its sibling's CTAs, cta_rows).
struct LaneRows {
  int sub;               // the lane's place in its group
  int row_in_cta;        // the first of its R rows in the CTA's step
  int64_t rows_per_cta;  // rows of one step of the CTA
  __device__ LaneRows(int G, int R) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    sub = lane & (G - 1);
    row_in_cta = warp * R * (32 / G) + R * (lane / G);
    rows_per_cta = gemv_rows_per_cta(blockDim.x, G, R);
  }
};

// Ends a GEMV row step: sums acc over the G lanes (a power of two, aligned) that share rows
// row .. row + R - 1, then the group's first lane (sub == 0) stores acc[r][b] * scale at
// out[b * m + row + r] for the rows below `end` (the sibling's last, kernels.h) and the batch
// rows below `batch`. Every lane of the warp calls it (shuffles).
template <int R, int NB>
__device__ __forceinline__ void reduce_and_store(float (&acc)[R][NB], int G, int sub,
                                                 int64_t row, int64_t end, int64_t m, int batch,
                                                 float scale, void* out, DType dtype) {
  for (int off = G / 2; off > 0; off /= 2) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[r][b] += __shfl_xor_sync(0xffffffffu, acc[r][b], off);
  }
  if (sub != 0) return;
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (row + r < end)
#pragma unroll
      for (int b = 0; b < NB; ++b)
        if (b < batch) store_from_float(out, dtype, b * m + row + r, acc[r][b] * scale);
}

// Whether stage_activation may use vector loads.
inline bool stage_vectors(const void* x, const float* channel_scale, const int8_t* signs,
                          int64_t n) {
  return aligned16(x) && (channel_scale == nullptr || aligned16(channel_scale)) &&
         (reinterpret_cast<uintptr_t>(signs) & 7) == 0 && n % 8 == 0;
}

// Calls f with a typed pointer to the activation x of runtime dtype.
template <typename F>
__device__ __forceinline__ void with_typed_activation(const void* x, DType dtype, F&& f) {
  switch (dtype) {
    case DType::F16: f(static_cast<const __half*>(x)); break;
    case DType::BF16: f(static_cast<const __nv_bfloat16*>(x)); break;
    default: f(static_cast<const float*>(x)); break;
  }
}

}  // namespace qamw::cuda
