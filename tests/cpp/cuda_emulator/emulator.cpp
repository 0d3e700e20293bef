// The scheduler of the CUDA emulation (see cuda_runtime.h): the threads of the blocks of one
// cluster are fibers, resumed in turn until each reaches a barrier or returns. Any misuse the
// emulation can see is a fatal error with a message, as a hang or undefined behaviour would be on
// a GPU.
#include "cuda_runtime.h"
#include "cuda_pipeline.h"

#include <sys/mman.h>
#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define QAMW_EMU_ASAN 1
#else
#define QAMW_EMU_ASAN 0
#endif

namespace qamw_emu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr unsigned kMaxClusterBlocks = 8;  // CUDA's portable cluster size
constexpr int kMaxFibers = kMaxClusterBlocks * kMaxThreads;
constexpr size_t kStackBytes = 64 * 1024;
constexpr int kDefaultDynamicShared = 48 * 1024;

// Exits at once (exit code 3): the failing thread may be on a fiber's stack, so nothing unwinds.
[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulator: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x,
               blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(3);
}

enum class State { Ready, AtBarrier, AtClusterBarrier, AtExchange, Done };

// An asynchronous copy (cuda_pipeline.h) not yet made, and the batch it was committed in.
struct PendingCopy {
  void* dst;
  const void* src;
  size_t bytes;
  size_t batch;
};

struct Thread {
  State state = State::Ready;
  uint3 index{};
  bool waited = false;  // called cudaGridDependencySynchronize
  std::vector<PendingCopy> copies;
  size_t committed = 0;  // batches committed so far
};

// A fiber per thread slot, made once and reused by every block and launch. Switching uses
// _setjmp / _longjmp (no system call, unlike swapcontext); makecontext only gives each fiber
// its stack once.
struct Fiber {
  jmp_buf jump;
  void* fake_stack = nullptr;  // AddressSanitizer's record of the fiber's stack
};

struct Exchange {  // one warp's shuffle in progress
  unsigned arrived = 0, mask = 0;
  size_t bytes = 0;
  unsigned char value[32][8];
  void* result[32];
  int src[32];
};

struct Mma {  // one warp's mma in progress
  unsigned arrived = 0;
  uint32_t a[32][4], b[32][2];
  float* d[32];
};

struct BlockRun {
  uint3 index{};  // blockIdx
  unsigned rank = 0;  // in the cluster
  int first_fiber = 0;  // thread i runs on fiber first_fiber + i
  std::vector<Thread> threads;
  std::vector<Exchange> warps;
  std::vector<Mma> mmas;
  int current = -1, done = 0;
  int arrived = 0;  // at the __syncthreads in progress
  bool any = false;  // a nonzero predicate at the __syncthreads_or in progress
  bool any_result = false;  // ... at the last one released
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  std::unique_ptr<unsigned char[]> shared;
};

struct ClusterRun {
  std::vector<BlockRun> blocks;  // by rank
  const std::function<void()>* body = nullptr;
  bool overlapped = false;  // launched with programmatic stream serialization
  size_t shared_bytes = 0;
  int done = 0;  // threads of all blocks that exited
  int arrived = 0;  // at the cluster barrier in progress
  const char* barrier_file = nullptr;
  int barrier_line = 0;
};

Schedule g_schedule = Schedule::Forward;
int64_t g_cluster_launches[kMaxClusterBlocks + 1] = {};  // by blocks a cluster
ClusterRun* g_cluster = nullptr;
BlockRun* g_run = nullptr;  // the block of the running thread
std::map<std::pair<int, const void*>, int> g_max_dynamic_shared;  // by device and kernel
Device g_devices[kDevices];
int g_current_device = 0;
int64_t g_runtime_queries = 0;

Fiber g_fibers[kMaxFibers];
int g_fiber_count = 0;
jmp_buf g_scheduler_jump;
#if QAMW_EMU_ASAN
const void* g_scheduler_stack = nullptr;  // the scheduler's stack, for AddressSanitizer
size_t g_scheduler_stack_size = 0;
#endif

// One stack per fiber, reserved once; pages are committed only when touched.
unsigned char* stack_of(int i) {
  static unsigned char* stacks = [] {
    void* p = mmap(nullptr, kStackBytes * kMaxFibers, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot reserve fiber stacks");
    return static_cast<unsigned char*>(p);
  }();
  return stacks + kStackBytes * i;
}

// From fiber i to the scheduler; returns when the scheduler resumes fiber i.
__attribute__((noinline)) void to_scheduler(int i) {
  Fiber& f = g_fibers[i];
  if (_setjmp(f.jump) == 0) {
#if QAMW_EMU_ASAN
    __sanitizer_start_switch_fiber(&f.fake_stack, g_scheduler_stack, g_scheduler_stack_size);
#endif
    _longjmp(g_scheduler_jump, 1);
  }
#if QAMW_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
}

// From the scheduler to fiber i; returns when the fiber yields.
__attribute__((noinline)) void to_fiber(int i) {
#if QAMW_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, stack_of(i), kStackBytes);
#endif
  if (_setjmp(g_scheduler_jump) == 0) _longjmp(g_fibers[i].jump, 1);
#if QAMW_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

void yield() { to_scheduler(g_run->first_fiber + g_run->current); }

void release_barrier(BlockRun& r) {
  for (Thread& t : r.threads)
    if (t.state == State::AtBarrier) t.state = State::Ready;
  r.arrived = 0;
  r.any_result = r.any;
  r.any = false;
}

void thread_exit(ClusterRun& c, BlockRun& r, int i) {
  r.threads[i].state = State::Done;
  ++c.done;
  // A GPU frees an exited block's shared memory: a peer that reads it after this reads NaN.
  if (++r.done == static_cast<int>(r.threads.size()))
    std::memset(r.shared.get(), 0xff, c.shared_bytes);
  if (r.arrived > 0) fail("thread exited while others wait at a __syncthreads");
  if (c.arrived > 0) fail("thread exited while others of its cluster wait at a cluster barrier");
  const Exchange& e = r.warps[i / warpSize];
  if (e.arrived != 0 && (e.mask >> (i % warpSize) & 1))
    fail("thread exited while its warp waits for it in a shuffle");
  if (r.mmas[i / warpSize].arrived != 0) fail("thread exited while its warp waits in an mma");
  if (c.overlapped && !r.threads[i].waited)
    fail("thread of an overlapped launch exited without cudaGridDependencySynchronize");
}

// Fiber i: runs a thread of the cluster (the same one while a launch runs) each time the
// scheduler resumes it.
int g_new_fiber = 0;
void fiber_main() {
  const int i = g_new_fiber;
#if QAMW_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
  for (;;) {
    to_scheduler(i);  // parked until a block needs the thread
    (*g_cluster->body)();
    thread_exit(*g_cluster, *g_run, g_run->current);
  }
}

void make_fibers(int count) {
  static ucontext_t scheduler;
  for (; g_fiber_count < count; ++g_fiber_count) {
    ucontext_t c;
    getcontext(&c);
    c.uc_stack.ss_sp = stack_of(g_fiber_count);
    c.uc_stack.ss_size = kStackBytes;
    c.uc_link = nullptr;
    makecontext(&c, fiber_main, 0);
    g_new_fiber = g_fiber_count;
#if QAMW_EMU_ASAN
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&fake_stack, stack_of(g_fiber_count), kStackBytes);
#endif
    // The fiber parks at once with a jump back here.
    if (_setjmp(g_scheduler_jump) == 0) swapcontext(&scheduler, &c);
#if QAMW_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  }
}

void check_cluster_size(unsigned blocks) {
  if (blocks < 1 || blocks > kMaxClusterBlocks) fail("cluster of other than 1 to 8 blocks");
}

// Runs the cluster's blocks, whose blockIdx are set, from their first instruction to the end.
void run_cluster(ClusterRun& c) {
  const int nthreads = static_cast<int>(c.blocks[0].threads.size());
  const int nblocks = static_cast<int>(c.blocks.size());
  for (BlockRun& r : c.blocks) {
    for (int i = 0; i < nthreads; ++i) {
      r.threads[i] = Thread{};
      r.threads[i].index = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y,
                                 i / (blockDim.x * blockDim.y)};
    }
    r.done = 0;
    r.arrived = 0;
    for (Exchange& e : r.warps) e = Exchange{};
    for (Mma& m : r.mmas) m.arrived = 0;
    r.shared.reset(new unsigned char[c.shared_bytes]);
    std::memset(r.shared.get(), 0xff, c.shared_bytes);  // NaN floats until written
  }
  c.done = 0;
  c.arrived = 0;
  const bool forward = g_schedule == Schedule::Forward;
  while (c.done < nblocks * nthreads) {
    bool progressed = false;
    for (int b = 0; b < nblocks; ++b) {
      BlockRun& r = c.blocks[forward ? b : nblocks - 1 - b];
      for (int k = 0; k < nthreads; ++k) {
        const int i = forward ? k : nthreads - 1 - k;
        if (r.threads[i].state != State::Ready) continue;
        g_run = &r;
        r.current = i;
        blockIdx = r.index;
        threadIdx = r.threads[i].index;
        to_fiber(r.first_fiber + i);
        progressed = true;
      }
    }
    if (!progressed) {
      int at_barrier = 0, at_cluster_barrier = 0, at_exchange = 0;
      for (const BlockRun& r : c.blocks)
        for (const Thread& t : r.threads) {
          at_barrier += t.state == State::AtBarrier;
          at_cluster_barrier += t.state == State::AtClusterBarrier;
          at_exchange += t.state == State::AtExchange;
        }
      char what[200];
      std::snprintf(what, sizeof what,
                    "deadlock: %d threads wait at __syncthreads, %d at a cluster barrier, "
                    "%d in shuffles, %d exited",
                    at_barrier, at_cluster_barrier, at_exchange, c.done);
      fail(what);
    }
  }
}

// Records where the first thread to arrive at a barrier waits (`arrived` before it is 0); a
// later one waiting elsewhere is an error, `barriers` naming the kind.
void check_barrier_place(int arrived, const char*& place_file, int& place_line, const char* file,
                         int line, const char* barriers) {
  if (arrived == 0) {
    place_file = file;
    place_line = line;
  } else if (place_line != line || std::strcmp(place_file, file) != 0) {
    char what[512];
    std::snprintf(what, sizeof what, "threads wait at different %s: %s:%d and %s:%d", barriers,
                  place_file, place_line, file, line);
    fail(what);
  }
}

}  // namespace

Device& device() { return g_devices[g_current_device]; }

int current_device() { return g_current_device; }

void set_current_device(int dev) {
  if (dev < 0 || dev >= kDevices) fail("cudaSetDevice of a device that does not exist");
  g_current_device = dev;
}

int64_t runtime_queries() { return g_runtime_queries; }

void count_runtime_query() { ++g_runtime_queries; }

void set_schedule(Schedule s) { g_schedule = s; }

void sync_block(const char* file, int line) {
  BlockRun& r = *g_run;
  if (r.done > 0) fail("__syncthreads reached after another thread of the block exited");
  check_barrier_place(r.arrived, r.barrier_file, r.barrier_line, file, line, "__syncthreads");
  r.threads[r.current].state = State::AtBarrier;
  if (++r.arrived == static_cast<int>(blockDim.x * blockDim.y * blockDim.z)) release_barrier(r);
  yield();
}

int sync_block_or(int predicate, const char* file, int line) {
  g_run->any |= predicate != 0;
  sync_block(file, line);
  return g_run->any_result;  // every thread resumes before any can reach the next barrier
}

void warp_exchange(unsigned mask, const void* value, void* result, size_t bytes, int src) {
  BlockRun& r = *g_run;
  const int i = r.current, lane = i % warpSize, first = i - lane;
  const int nthreads = static_cast<int>(r.threads.size());
  Exchange& e = r.warps[i / warpSize];
  if (!(mask >> lane & 1)) fail("shuffle by a lane outside its mask");
  if (e.arrived != 0 && (e.mask != mask || e.bytes != bytes))
    fail("lanes of a warp are in different shuffles");
  if (!(mask >> src & 1)) fail("shuffle reads a lane outside its mask");
  for (int l = 0; l < warpSize; ++l) {
    if (!(mask >> l & 1)) continue;
    if (first + l >= nthreads) fail("shuffle mask names a lane past the block's threads");
    if (r.threads[first + l].state == State::Done) fail("shuffle mask names a lane that exited");
  }
  e.mask = mask;
  e.bytes = bytes;
  std::memcpy(e.value[lane], value, bytes);
  e.result[lane] = result;
  e.src[lane] = src;
  e.arrived |= 1u << lane;
  r.threads[i].state = State::AtExchange;
  if (e.arrived == mask) {
    for (int l = 0; l < warpSize; ++l) {
      if (!(mask >> l & 1)) continue;
      std::memcpy(e.result[l], e.value[e.src[l]], bytes);
      r.threads[first + l].state = State::Ready;
    }
    e.arrived = 0;
  }
  yield();
}

void warp_mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  BlockRun& r = *g_run;
  const int i = r.current, lane = i % warpSize, first = i - lane;
  if (first + warpSize > static_cast<int>(r.threads.size()))
    fail("mma in a warp of fewer than 32 threads");
  for (int l = 0; l < warpSize; ++l)
    if (r.threads[first + l].state == State::Done) fail("mma by a warp one of whose lanes exited");
  if (r.warps[i / warpSize].arrived != 0) fail("lanes of a warp are in a shuffle and an mma");
  Mma& m = r.mmas[i / warpSize];
  std::memcpy(m.a[lane], a, sizeof a);
  std::memcpy(m.b[lane], b, sizeof b);
  m.d[lane] = d;
  m.arrived |= 1u << lane;
  r.threads[i].state = State::AtExchange;
  if (m.arrived == 0xffffffffu) {
    const auto low = [](uint32_t v) { return __uint_as_float(v << 16); };
    const auto high = [](uint32_t v) { return __uint_as_float(v & 0xffff0000u); };
    const auto dot = [&](uint32_t x, uint32_t y) { return low(x) * low(y) + high(x) * high(y); };
    float out[32][4];
    for (int l = 0; l < warpSize; ++l) {
      const int g = l / 4, t = l % 4;
      for (int c = 0; c < 4; ++c) out[l][c] = m.d[l][c];
      for (int kp = 0; kp < 8; ++kp) {  // k = 2 kp, 2 kp + 1: lanes with t = kp % 4 hold it
        const int src = kp % 4, upper = kp / 4;
        const uint32_t row_g = m.a[4 * g + src][2 * upper];
        const uint32_t row_g8 = m.a[4 * g + src][2 * upper + 1];
        const uint32_t col0 = m.b[4 * (2 * t) + src][upper];
        const uint32_t col1 = m.b[4 * (2 * t + 1) + src][upper];
        out[l][0] += dot(row_g, col0);
        out[l][1] += dot(row_g, col1);
        out[l][2] += dot(row_g8, col0);
        out[l][3] += dot(row_g8, col1);
      }
    }
    for (int l = 0; l < warpSize; ++l) {
      for (int c = 0; c < 4; ++c) m.d[l][c] = out[l][c];
      r.threads[first + l].state = State::Ready;
    }
    m.arrived = 0;
  }
  yield();
}

void grid_dependency_wait() { g_run->threads[g_run->current].waited = true; }

void pipeline_copy(void* dst, const void* src, size_t bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16)
    fail("asynchronous copy of other than 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    fail("asynchronous copy not aligned to its size");
  Thread& t = g_run->threads[g_run->current];
  t.copies.push_back({dst, src, bytes, t.committed});
}

void pipeline_commit() { ++g_run->threads[g_run->current].committed; }

void pipeline_wait_prior(size_t prior) {
  Thread& t = g_run->threads[g_run->current];
  std::vector<PendingCopy> later;
  for (const PendingCopy& c : t.copies) {
    if (c.batch + prior < t.committed) std::memcpy(c.dst, c.src, c.bytes);
    else later.push_back(c);
  }
  t.copies.swap(later);
}

void* dynamic_shared_memory() { return g_run->shared.get(); }

unsigned cluster_rank() { return g_run->rank; }

int64_t cluster_launches(unsigned blocks) {
  return blocks >= 2 && blocks <= kMaxClusterBlocks ? g_cluster_launches[blocks] : 0;
}

int64_t launches() {
  int64_t count = 0;
  for (const int64_t c : g_cluster_launches) count += c;
  return count;
}

unsigned cluster_size() { return static_cast<unsigned>(g_cluster->blocks.size()); }

void sync_cluster(const char* file, int line) {
  ClusterRun& c = *g_cluster;
  if (c.done > 0) fail("cluster barrier reached after a thread of the cluster exited");
  check_barrier_place(c.arrived, c.barrier_file, c.barrier_line, file, line, "cluster barriers");
  g_run->threads[g_run->current].state = State::AtClusterBarrier;
  const size_t cluster_threads = c.blocks.size() * c.blocks[0].threads.size();
  if (++c.arrived == static_cast<int>(cluster_threads)) {
    for (BlockRun& r : c.blocks)
      for (Thread& t : r.threads)
        if (t.state == State::AtClusterBarrier) t.state = State::Ready;
    c.arrived = 0;
  }
  yield();
}

void* cluster_shared(void* p, unsigned rank) {
  const ClusterRun& c = *g_cluster;
  // As integers: p may point anywhere, and below the buffer the difference wraps to a large one.
  const uintptr_t offset =
      reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(g_run->shared.get());
  if (offset >= c.shared_bytes)
    fail("cluster_shared of a pointer outside the block's dynamic shared memory");
  if (rank >= c.blocks.size()) {
    char what[128];
    std::snprintf(what, sizeof what, "cluster_shared of block %u of a cluster of %zu", rank,
                  c.blocks.size());
    fail(what);
  }
  return c.blocks[rank].shared.get() + offset;
}

void set_max_dynamic_shared(const void* kernel, int bytes) {
  g_max_dynamic_shared[{g_current_device, kernel}] = bytes;
}

int max_dynamic_shared(const void* kernel) {
  const auto it = g_max_dynamic_shared.find({g_current_device, kernel});
  return it == g_max_dynamic_shared.end() ? kDefaultDynamicShared : it->second;
}

unsigned cluster_blocks(const cudaLaunchConfig_t* config) {
  unsigned blocks = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id != cudaLaunchAttributeClusterDimension) continue;
    const auto& dim = config->attrs[i].val.clusterDim;
    if (dim.y != 1 || dim.z != 1) fail("cluster dimension other than 1 along y or z");
    check_cluster_size(dim.x);
    blocks = dim.x;
  }
  return blocks;
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem,
              const std::function<void()>& thread_body, bool overlapped, unsigned cluster) {
  const int64_t nthreads = int64_t{block.x} * block.y * block.z;
  if (nthreads < 1 || nthreads > kMaxThreads || block.z > 64)
    fail("launch with an invalid number of threads per block");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535)
    fail("launch with an invalid grid");
  check_cluster_size(cluster);
  if (grid.x % cluster != 0) fail("launch with a cluster size that does not divide gridDim.x");
  ++g_cluster_launches[cluster];
  if (smem > static_cast<size_t>(device().shared_per_block_optin))
    fail("launch with more dynamic shared memory than the device has per block");
  if (smem > static_cast<size_t>(max_dynamic_shared(kernel)))
    fail("launch with more dynamic shared memory than cudaFuncSetAttribute allowed");
  if (g_cluster != nullptr) fail("launch from inside a kernel");

  make_fibers(static_cast<int>(cluster * nthreads));
  ClusterRun run;
  run.blocks.resize(cluster);
  for (unsigned rank = 0; rank < cluster; ++rank) {
    BlockRun& r = run.blocks[rank];
    r.rank = rank;
    r.first_fiber = static_cast<int>(rank * nthreads);
    r.threads.resize(nthreads);
    r.warps.resize((nthreads + warpSize - 1) / warpSize);
    r.mmas.resize(r.warps.size());
  }
  run.body = &thread_body;
  run.overlapped = overlapped;
  run.shared_bytes = smem;
  g_cluster = &run;
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; x += cluster) {
        for (BlockRun& r : run.blocks) r.index = uint3{x + r.rank, y, z};
        run_cluster(run);
      }
  g_cluster = nullptr;
  g_run = nullptr;
}

}  // namespace qamw_emu
