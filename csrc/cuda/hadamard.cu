// Block Hadamard transform (orthonormal) on the GPU: blocks of 2^L (Sylvester order), and blocks
// of K * 2^m (hadamard_tables.h) as the 2^L transform of each run of 2^m values followed by a
// kernel that mixes the K runs.
//
// A block of B = 2^L values is spread over B / E threads holding E = min(B, 32) values each in
// registers (1024 threads at 2^15). The L index bits are handled in passes of up to 5 bits:
// pass 0 works on the E contiguous values each thread loaded (16-byte loads); each later pass
// exchanges the values through shared memory so that every thread holds the values that differ
// in the next 5 bits, and stores its final values with lanes on consecutive indices
// (coalesced). Shared memory is padded by one word every 32 so that both the strided writes of
// pass 0 and the reads are free of bank conflicts. Small blocks share a CTA so that every CTA
// has at least 128 threads; such a CTA stores its blocks together, from shared memory, in
// 8-value chunks.
//
// Blocks of 2^14 and 2^15 take 66 and 132 KiB of shared memory, so an SM holds two CTAs of
// 2^14 or one of 2^15 and few other loads overlap a block's transform. For 16-bit values a
// persistent CTA therefore stages the input of its next block in shared memory with
// asynchronous copies while it transforms the current one (STAGED; the staged input takes 32 or
// 64 KiB beside the exchange buffer).
#include <cuda_pipeline.h>

#include <utility>

#include "../hadamard_tables.h"
#include "common.cuh"

namespace qamw::cuda {
namespace {

constexpr int kPassBits = 5;

template <int L>
struct HadamardShape {
  static constexpr int block = 1 << L;
  static constexpr int reg_bits = L < kPassBits ? L : kPassBits;
  static constexpr int per_thread = 1 << reg_bits;                   // E
  static constexpr int threads_per_block = block / per_thread;        // threads on one block
  static constexpr int blocks_per_cta = threads_per_block >= 128 ? 1 : 128 / threads_per_block;
  static constexpr int threads = threads_per_block * blocks_per_cta;
  static constexpr int passes = (L + kPassBits - 1) / kPassBits;
  static constexpr int smem_per_block = passes > 1 ? block + block / 32 : 0;  // floats
};

// 1 / sqrt(2^L), exactly rounded: a power of two times sqrt(1/2) when L is odd.
template <int L>
constexpr float inv_sqrt_pow2() {
  float v = 1.0f;
  for (int i = 0; i < L / 2; ++i) v *= 0.5f;
  return L % 2 ? v * 0.70710678118654752f : v;
}

__device__ __forceinline__ int padded(int i) { return i + (i >> 5); }

// Index within the block of slot `sl` of thread t in pass p: the slot's low r bits are the
// index bits [lo, lo + r) this pass transforms; the thread and column number fill the other
// bits, low bits first, so that consecutive threads hold consecutive indices.
template <int L, int P>
__device__ __forceinline__ int pass_index(int t, int sl) {
  using S = HadamardShape<L>;
  constexpr int lo = P * kPassBits;
  constexpr int r = (L - lo) < kPassBits ? (L - lo) : kPassBits;
  const int c = sl >> r, i = sl & ((1 << r) - 1);
  const int u = t + S::threads_per_block * c;
  return (u & ((1 << lo) - 1)) | (i << lo) | ((u >> lo) << (lo + r));
}

// pass_index places the bits of t, of the column and of the slot in disjoint index bits, so an
// index is the sum of the thread's part, pass_index(t, 0), and the slot's, pass_index(0, sl),
// and padded() of it the sum of padded() of each. Addressing a slot as the thread's base plus
// this compile-time offset keeps one base register a pass, where an address per slot took 32
// registers and held the 2^11 - 2^15 kernels at 128 (one in four warps an SM).
template <int L, int P>
__device__ __forceinline__ int slot_offset(int sl) {
  return padded(pass_index<L, P>(0, sl));
}

// Passes P.. through shared memory; on return v holds the values of the last pass's layout.
template <int L, int P>
__device__ __forceinline__ void shared_passes(float (&v)[HadamardShape<L>::per_thread], float* s,
                                              int t) {
  using S = HadamardShape<L>;
  constexpr int r = (L - P * kPassBits) < kPassBits ? (L - P * kPassBits) : kPassBits;
  float* mine = s + padded(pass_index<L, P>(t, 0));
  __syncthreads();
#pragma unroll
  for (int sl = 0; sl < S::per_thread; ++sl) v[sl] = mine[slot_offset<L, P>(sl)];
  butterflies<r>(v);
  if constexpr (P + 1 < S::passes) {
    // Each thread writes back only the words it read, so no barrier is needed before this.
#pragma unroll
    for (int sl = 0; sl < S::per_thread; ++sl) mine[slot_offset<L, P>(sl)] = v[sl];
    shared_passes<L, P + 1>(v, s, t);
  }
}

// Starts the copy of a thread's E 16-bit values of a block (16-byte aligned) into its slots of
// the staging area: 16-byte chunk q of thread t at chunk q * threads + t, so that the reads
// back, one chunk of every lane at a time, are free of bank conflicts.
template <typename T, int E, int kThreadsPerBlock>
__device__ __forceinline__ void stage_values(const T* src, uint4* stage, int t) {
  static_assert(sizeof(T) == 2 && E % 8 == 0, "16-bit values in whole 16-byte chunks");
#pragma unroll
  for (int q = 0; q < E / 8; ++q)
    __pipeline_memcpy_async(stage + q * kThreadsPerBlock + t, src + 8 * q, 16);
  __pipeline_commit();
}

// Waits for the thread's staged values and converts them to floats.
template <typename T, int E, int kThreadsPerBlock>
__device__ __forceinline__ void unstage_values(const uint4* stage, int t, float (&v)[E]) {
  __pipeline_wait_prior(0);
#pragma unroll
  for (int q = 0; q < E / 8; ++q) {
    const uint4 raw = stage[q * kThreadsPerBlock + t];
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[8 * q + i] = to_float(e[i]);
  }
}

template <typename T, int L, bool STAGED>
__global__ void __launch_bounds__(HadamardShape<L>::threads)
    hadamard_kernel(const T* x, T* out, int64_t nblocks,
                    int64_t blocks_per_row, const int8_t* __restrict__ signs, bool inverse,
                    bool vec) {
  using S = HadamardShape<L>;
  constexpr int E = S::per_thread;
  static_assert(!STAGED || S::blocks_per_cta == 1, "a staged CTA holds one block");
  extern __shared__ float smem[];
  const int g = threadIdx.x / S::threads_per_block, t = threadIdx.x % S::threads_per_block;
  float* s = smem + g * S::smem_per_block;
  uint4* stage = reinterpret_cast<uint4*>(smem + S::smem_per_block);  // STAGED only
  const int64_t ngroups = (nblocks + S::blocks_per_cta - 1) / S::blocks_per_cta;
  if constexpr (STAGED) {
    if (blockIdx.x < ngroups)
      stage_values<T, E, S::threads_per_block>(x + blockIdx.x * S::block + t * E, stage, t);
  }
  for (int64_t grp = blockIdx.x; grp < ngroups; grp += gridDim.x) {
    const int64_t blk = grp * S::blocks_per_cta + g;
    const bool valid = blk < nblocks;  // invalid threads still reach every barrier
    const int64_t base = blk * S::block;
    const int8_t* sg = signs ? signs + (blk % blocks_per_row) * S::block : nullptr;

    float v[E];
    if (valid) {
      if constexpr (STAGED) {
        unstage_values<T, E, S::threads_per_block>(stage, t, v);
      } else {
        load_floats<T, E>(x + base + t * E, v, vec);
      }
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const float f = (sg && !inverse) ? static_cast<float>(sg[t * E + i]) : 1.0f;
        v[i] *= f * inv_sqrt_pow2<L>();
      }
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) v[i] = 0.0f;
    }
    butterflies<S::reg_bits>(v);

    if constexpr (S::passes == 1) {
      if (valid) {
        if (sg && inverse) {
#pragma unroll
          for (int i = 0; i < E; ++i) v[i] *= static_cast<float>(sg[t * E + i]);
        }
        store_floats<T, E>(out + base + t * E, v, vec);
      }
    } else {
      __syncthreads();  // the previous group's last reads are done
#pragma unroll
      for (int i = 0; i < E; ++i) s[padded(t * E + i)] = v[i];
      if constexpr (STAGED) {
        // The next block's input travels while this one takes its shared-memory passes and
        // is stored; issued here, where v is in shared memory, it holds no extra registers.
        // Each thread staged and read back only its own chunks: no barrier is needed.
        if (grp + gridDim.x < ngroups)
          stage_values<T, E, S::threads_per_block>(x + (grp + gridDim.x) * S::block + t * E,
                                                   stage, t);
      }
      shared_passes<L, 1>(v, s, t);
      constexpr int last = S::passes - 1;
      const int first_index = pass_index<L, last>(t, 0);  // slot sl at + pass_index(0, sl)
      if constexpr (S::blocks_per_cta == 1) {
        // The last pass leaves a warp's lanes on 32 consecutive values: whole sectors.
        if (valid) {
#pragma unroll
          for (int sl = 0; sl < E; ++sl) {
            const int idx = first_index + pass_index<L, last>(0, sl);
            const float f = (sg && inverse) ? static_cast<float>(sg[idx]) : 1.0f;
            out[base + idx] = from_float<T>(v[sl] * f);
          }
        }
      } else {
        // Small blocks (2^6 - 2^9) leave a block's lanes on 2 - 16 consecutive values, so
        // storing from registers writes parts of sectors (on an H100 2^7 moved ~3.5x its bytes
        // through L2, NOTES GPU v8). The values go back to shared memory and the CTA stores
        // its blocks, contiguous in memory, as 8-value chunks, consecutive lanes on
        // consecutive chunks.
        if (valid) {
          const int first_word = padded(first_index);
#pragma unroll
          for (int sl = 0; sl < E; ++sl) {
            const int idx = first_index + pass_index<L, last>(0, sl);
            const float f = (sg && inverse) ? static_cast<float>(sg[idx]) : 1.0f;
            s[first_word + slot_offset<L, last>(sl)] = v[sl] * f;
          }
        }
        __syncthreads();
        const int64_t first = grp * S::blocks_per_cta;
        const int64_t blocks = nblocks - first < S::blocks_per_cta ? nblocks - first
                                                                    : S::blocks_per_cta;
        for (int q = threadIdx.x; q < blocks * (S::block / 8); q += S::threads) {
          const int j = 8 * q, b = j >> L, jb = j & (S::block - 1);
          const float* src = smem + b * S::smem_per_block;
          float w[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) w[e] = src[padded(jb + e)];
          store_floats<T, 8>(out + first * S::block + j, w, vec);
        }
      }
    }
  }
}

// Dynamic shared memory of hadamard_kernel<T, L, false>: HadamardShape's figure, for L = 1 ...
// 15 at run time.
template <int... Ls>
size_t smem_bytes_of(int L, std::integer_sequence<int, Ls...>) {
  constexpr size_t bytes[] = {sizeof(float) * HadamardShape<Ls + 1>::smem_per_block *
                              HadamardShape<Ls + 1>::blocks_per_cta...};
  return bytes[L - 1];
}
size_t hadamard_smem_bytes(int L) {
  return smem_bytes_of(L, std::make_integer_sequence<int, 15>{});
}

template <typename T, int L>
void launch(const T* x, T* out, int64_t nblocks, int64_t blocks_per_row, const int8_t* signs,
            bool inverse, cudaStream_t stream) {
  using S = HadamardShape<L>;
  const size_t smem = sizeof(float) * S::smem_per_block * S::blocks_per_cta;
  const int64_t ngroups = ceil_div(nblocks, S::blocks_per_cta);
  const bool vec = aligned16(x) && aligned16(out);
  if constexpr (L >= 14 && sizeof(T) == 2) {
    // Staged where the device holds both buffers and x is 16-byte aligned; a persistent grid,
    // each CTA striding over the blocks.
    const size_t staged_smem = smem + sizeof(T) * S::block;
    auto staged = hadamard_kernel<T, L, true>;
    if (aligned16(x) && allow_smem(staged, staged_smem)) {
      const unsigned grid = persistent_grid(staged, S::threads, staged_smem, ngroups, 1);
      staged<<<grid, S::threads, staged_smem, stream>>>(x, out, nblocks, blocks_per_row, signs,
                                                        inverse, vec);
      return;
    }
  }
  auto kernel = hadamard_kernel<T, L, false>;
  allow_smem(kernel, smem);
  kernel<<<capped_grid(ngroups), S::threads, smem, stream>>>(x, out, nblocks, blocks_per_row,
                                                             signs, inverse, vec);
}

constexpr int kMixThreads = 256;

// Joins transformed runs of `half` values in pairs into transforms of 2 * half: values i and
// i + half of each pair become (a + b, a - b) / sqrt(2), times signs_out (row position) if given.
template <typename T>
__global__ void __launch_bounds__(kMixThreads)
    join_halves_kernel(T* v, int64_t columns, int64_t half, int64_t n, const int8_t* signs_out) {
  for (int64_t col = int64_t{blockIdx.x} * kMixThreads + threadIdx.x; col < columns;
       col += int64_t{gridDim.x} * kMixThreads) {
    const int64_t pair = col / half, base = pair * 2 * half + (col - pair * half);
    const float a = to_float(v[base]), b = to_float(v[base + half]);
    float y0 = (a + b) * 0.70710678118654752f, y1 = (a - b) * 0.70710678118654752f;
    if (signs_out) {
      y0 *= static_cast<float>(signs_out[base % n]);
      y1 *= static_cast<float>(signs_out[(base + half) % n]);
    }
    v[base] = from_float<T>(y0);
    v[base + half] = from_float<T>(y1);
  }
}

// The 2^L transform of every block of `block` (a power of two from 2 to 2^15) values. When the
// device's shared memory cannot hold a block (2^15 needs 132 KiB, 2^14 66 KiB), the largest
// block that fits is transformed and join_halves_kernel doubles it until it is whole.
template <typename T>
void launch_pow2(const T* x, T* out, int64_t rows, int64_t n, int64_t block, const int8_t* signs,
                 bool inverse, cudaStream_t s) {
  int L = 0;
  while ((int64_t{1} << L) < block) ++L;
  const int optin = shared_per_block_optin();
  int fit = L;
  while (hadamard_smem_bytes(fit) > static_cast<size_t>(optin)) --fit;
  const int joins = L - fit;
  const int64_t nblocks = (rows * (n / block)) << joins, blocks_per_row = (n / block) << joins;
  // Joined: the signs of the inverse multiply the last join's outputs instead.
  const int8_t* first_signs = joins > 0 && inverse ? nullptr : signs;
  const bool first_inverse = joins > 0 ? false : inverse;
  switch (fit) {
#define QAMW_POW2_CASE(B)                                                                   \
  case B: launch<T, B>(x, out, nblocks, blocks_per_row, first_signs, first_inverse, s); break;
    QAMW_POW2_CASE(1) QAMW_POW2_CASE(2) QAMW_POW2_CASE(3) QAMW_POW2_CASE(4) QAMW_POW2_CASE(5)
    QAMW_POW2_CASE(6) QAMW_POW2_CASE(7) QAMW_POW2_CASE(8) QAMW_POW2_CASE(9) QAMW_POW2_CASE(10)
    QAMW_POW2_CASE(11) QAMW_POW2_CASE(12) QAMW_POW2_CASE(13) QAMW_POW2_CASE(14)
    default: launch<T, 15>(x, out, nblocks, blocks_per_row, first_signs, first_inverse, s); break;
#undef QAMW_POW2_CASE
  }
  const int64_t columns = rows * n / 2;
  const unsigned grid = capped_grid(ceil_div(columns, kMixThreads));
  for (int j = 0; j < joins; ++j) {
    join_halves_kernel<T><<<grid, kMixThreads, 0, s>>>(
        out, columns, int64_t{1} << (fit + j), n, j == joins - 1 && inverse ? signs : nullptr);
  }
}

// Calls f(IntC<K>{}) when `order` is the tabulated order K; nothing otherwise.
template <typename F>
void dispatch_order(int64_t order, F&& f) {
  switch (order) {
#define QAMW_ORDER_CASE(K) \
  case K: f(IntC<K>{}); break;
    QAMW_FOR_EACH_HADAMARD_ORDER(QAMW_ORDER_CASE)
#undef QAMW_ORDER_CASE
    default: break;
  }
}

// sum_c H[a][c] v[c] for the row H[a] given as its mask (bit c set where H[a][c] = -1).
template <int K>
__device__ __forceinline__ float hadamard_row_dot(uint64_t row, const float (&v)[K]) {
  float even = 0.0f, odd = 0.0f;   // two chains: half the dependent-add latency
#pragma unroll
  for (int c = 0; c < K; c += 2) {
    even += (row >> c & 1) ? -v[c] : v[c];
    odd += (row >> (c + 1) & 1) ? -v[c + 1] : v[c + 1];
  }
  return even + odd;
}

// Mixes the K runs of P values of every block of K * P: value (a, b) of a block (index a * P + b)
// becomes scale * sum_c H[a][c] * value (c, b), H the K mask rows of kHadamardMasks from `table`
// (H_K or H_K^T). A thread owns one column b of one block and reads all K of its values before
// writing any, so `in` may be `out`. Signs multiply the values read (signs_in) or written
// (signs_out).
template <typename T, int K>
__global__ void __launch_bounds__(kMixThreads)
    mix_kernel(const T* in, T* out, int64_t columns, int P, int64_t blocks_per_row, int table,
               const int8_t* signs_in, const int8_t* signs_out, float scale) {
  for (int64_t col = int64_t{blockIdx.x} * kMixThreads + threadIdx.x; col < columns;
       col += int64_t{gridDim.x} * kMixThreads) {
    const int64_t blk = col / P, b = col - blk * P;
    const int64_t base = blk * K * P + b;                          // value (a, b) at base + a * P
    const int64_t sbase = (blk % blocks_per_row) * K * P + b;      // its sign at sbase + a * P
    float v[K];
#pragma unroll
    for (int a = 0; a < K; ++a) {
      v[a] = to_float(in[base + a * P]);
      if (signs_in) v[a] *= static_cast<float>(signs_in[sbase + a * P]);
    }
    // Not unrolled: K^2 additions of code for K = 60 would be large; v stays in registers.
#pragma unroll 1
    for (int a = 0; a < K; ++a) {
      float y = hadamard_row_dot<K>(kHadamardMasks[table + a], v) * scale;
      if (signs_out) y *= static_cast<float>(signs_out[sbase + a * P]);
      out[base + a * P] = from_float<T>(y);
    }
  }
}

}  // namespace

void hadamard(const void* x, void* out, DType dtype, int64_t rows, int64_t n, int64_t block,
              const int8_t* signs, bool inverse, void* stream) {
  if (rows == 0 || n == 0) return;
  const HadamardSplit split = split_hadamard_block(block);
  const int64_t P = split.pow2;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xi = static_cast<const T*>(x);
    T* o = static_cast<T*>(out);
    const cudaStream_t s = as_stream(stream);
    if (split.order == 1) {
      launch_pow2<T>(xi, o, rows, n, block, signs, inverse, s);
      return;
    }
    // K * P: the transform of the runs of P first (with the signs when forward: they come
    // before anything else), then the runs mixed in place by H_K, or by H_K^T with the signs
    // applied last when inverse. When P = 1 the mixing reads x itself.
    if (P > 1) launch_pow2<T>(xi, o, rows, n, P, inverse ? nullptr : signs, false, s);
    const T* in = P > 1 ? o : xi;
    const int8_t* signs_in = P > 1 || inverse ? nullptr : signs;
    const int8_t* signs_out = inverse ? signs : nullptr;
    const int64_t columns = rows * (n / split.order);
    const unsigned grid = capped_grid(ceil_div(columns, kMixThreads));
    const int table = hadamard_mask_offset(split.order, inverse);
    const float scale = static_cast<float>(1.0 / __builtin_sqrt(double(split.order)));
    dispatch_order(split.order, [&](auto k) {
      mix_kernel<T, decltype(k)::value><<<grid, kMixThreads, 0, s>>>(
          in, o, columns, static_cast<int>(P), n / block, table, signs_in, signs_out, scale);
    });
  });
}

}  // namespace qamw::cuda
