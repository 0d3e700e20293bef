// What the tensor-core GEMVs (qamw_mma.cu, aaac.cu) share: the mma instruction, operands
// split into high and low bf16 parts, and the B fragments of the activation.
//
// B fragments. The GEMVs order k as their lanes read the codes: a k-block is 4 * RUN pairs of
// values, lane (g, t) of a warp (g = lane / 4, t = lane % 4) holds the pairs RUN * t ...
// RUN * t + RUN - 1 of it, and at mma step s of the block its registers hold pairs RUN * t + 2 s
// (fragment k-pair t) and RUN * t + 2 s + 1 (k-pair t + 4). Any permutation of k applied to A
// and B alike leaves the product unchanged. Column c of a B tile of 8 is batch row c / 2: its
// high part when c is even, else its low one, so that the lane holding one (D columns 2t and
// 2t + 1) holds both and adds them. They are written once per call (format_fragments, or
// store_fragment_pairs from a kernel that has the values at hand): entry
// ((z * steps + step) * tiles + tile) * 32 + lane, so that a warp's load of one step and tile
// is 256 consecutive bytes.
#pragma once
#include "common.cuh"

namespace qamw::cuda {

// d += A B for one m16n8k16 tile of the warp: bf16 operands in the PTX fragment layout (lane
// l = 4 g + t holds A rows g and g + 8 at k-pairs t and t + 4 in a[0..3] = (g, t), (g + 8, t),
// (g, t + 4), (g + 8, t + 4); B column g at k-pairs t and t + 4 in b[0..1]; D rows g, g + 8 at
// columns 2 t, 2 t + 1 in d[0..3]), fp32 accumulators. sm_80 and later: launchers check
// (mma_allowed). The CUDA emulator computes it from every lane's fragments, so that the
// emulated tests check the layout the kernels assume. Every lane of the warp calls it.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4],
                                               const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(QAMW_CUDA_EMULATOR)
  qamw_emu::warp_mma_bf16_16816(d, a, b);
#endif
}

// Whether a GEMV of `batch` rows should take the tensor-core kernel where the weight allows:
// from batch `from` (2, or more for a kernel that costs more per weight than the CUDA-core one
// at batch 2). QAMW_GEMV_MMA=0 keeps every batch on the CUDA-core kernels, QAMW_GEMV_MMA=1
// gives every batch to tensor cores, for side-by-side benchmarks. Read at each launch, as
// QAMW_PDL is.
inline bool mma_wanted(int64_t batch, int64_t from = 2) {
  if (env_is("QAMW_GEMV_MMA", "0")) return false;
  return batch >= from || env_is("QAMW_GEMV_MMA", "1");
}

// Whether `kernel`, which uses mma_bf16_16816, runs here: the device is sm_80 or later and the
// kernel was compiled for it.
template <typename K>
bool mma_allowed(K kernel) {
  return runs_as_sm(kernel, 80);
}

// The bf16 value nearest v, and that value widened back.
__device__ __forceinline__ uint32_t bf16_bits(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ float bf16_value(uint32_t bits) { return __uint_as_float(bits << 16); }

// (a, b) as one bf16x2 register, a in the low half, each rounded to nearest: one instruction
// on sm_80 and later.
__device__ __forceinline__ uint32_t bf16x2_bits(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(b), "f"(a));  // first operand: high half
  return d;
#else
  return bf16_bits(a) | bf16_bits(b) << 16;
#endif
}

// (a, b) as two bf16x2 registers: the high parts, then the low parts (a - hi(a), b - hi(b)):
// 16 significant bits between them.
__device__ __forceinline__ uint2 split_pair(float a, float b) {
  const uint32_t high = bf16x2_bits(a, b);
  const float ha = bf16_value(high), hb = __uint_as_float(high & 0xFFFF0000u);
  return make_uint2(high, bf16x2_bits(a - ha, b - hb));
}

// The tensor-core GEMVs' work: a CTA owns 32 rows, four groups of 8 a warp (lane (g, t)
// decodes row g of each; the groups share each B load); its WARPS warps split the k-blocks and
// add their sums in shared memory (mma_sums_bytes) when the rows are done.
constexpr int kMmaGroups = 4;
constexpr int kMmaRowsPerCta = 8 * kMmaGroups;

// The warps of a CTA for `tiles` B tiles over m rows, its codebook 2^table_bits entries: 16 at
// one B tile when the rows make no more CTAs than the device has SMs, or when the table has
// 2^11 entries or more, else 8. Two CTAs of 8 warps an SM (one B tile: at most 128 registers a
// thread) left a 4096-row layer's 128 CTAs at one an SM, 8 warps, too few to hide the latency
// of loads and instruction fetches; one CTA of 16 (the same registers) was 1.06-1.8x faster
// there on an H100, but mostly slower (0.8-1.06x) at 8192 and 14336 rows, which fill two CTAs
// of 8 an SM that overlap each other's barriers. Tables of 2^11 entries and more gain at every
// size: one CTA an SM holds twice the copies (8 at 11 bits), so fewer lookups share banks
// (NOTES, GPU v12 and v13).
inline int mma_warps(int tiles, int64_t m, int table_bits) {
  const bool idle_sms = ceil_div(m, int64_t{kMmaRowsPerCta}) <= sm_count();
  return tiles == 1 && (idle_sms || table_bits >= 11) ? 16 : 8;
}
// CTAs an SM that a kernel of WARPS warps and NT B tiles is built for (__launch_bounds__).
__host__ __device__ constexpr int mma_ctas_per_sm(int warps, int tiles) {
  return warps == 8 && tiles == 1 ? 2 : 1;
}

__host__ __device__ constexpr int64_t mma_sums_bytes(int warps, int tiles) {
  return int64_t{sizeof(float)} * warps * kMmaGroups * tiles * 32;
}

// Calls f(IntC<warps>{}) for mma_warps' choice: 16 warps only at one B tile, so other tile
// counts instantiate the 8-warp kernels alone.
template <int NT, typename F>
void dispatch_warps(int warps, F&& f) {
  if constexpr (NT == 1) {
    if (warps == 16) return f(IntC<16>{});
  }
  f(IntC<8>{});
}

// B registers of mma step `step` for NT tiles (frag: the lane's entry of the k-block's first).
template <int NT>
__device__ __forceinline__ void load_b_step(const uint2* frag, int step,
                                            uint32_t (&b)[NT][2]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const uint2 v = __ldg(frag + (step * NT + nt) * 32);
    b[nt][0] = v.x;
    b[nt][1] = v.y;
  }
}

// acc[i][nt] += scale[i] times the k-block's D: (high, low) of the weight times (high, low) of
// the activation, the four partial products of one output.
template <int NT>
__device__ __forceinline__ void add_scaled_block(float (&acc)[kMmaGroups][NT],
                                                 const float (&part)[kMmaGroups][NT][4],
                                                 const float (&scale)[kMmaGroups]) {
#pragma unroll
  for (int i = 0; i < kMmaGroups; ++i)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      acc[i][nt] = fmaf(scale[i],
                        (part[i][nt][0] + part[i][nt][1]) + (part[i][nt][2] + part[i][nt][3]),
                        acc[i][nt]);
}

// The A registers of one weight row from the table entries of its two codes of a step: (high,
// low) parts as they are (rows g and g + 8), or (SCALED) float pairs times `scale`, split.
template <bool SCALED>
__device__ __forceinline__ void high_low_fragment(uint2 c0, uint2 c1, float scale,
                                                  uint32_t (&a)[4]) {
  if constexpr (SCALED) {
    c0 = split_pair(__uint_as_float(c0.x) * scale, __uint_as_float(c0.y) * scale);
    c1 = split_pair(__uint_as_float(c1.x) * scale, __uint_as_float(c1.y) * scale);
  }
  a[0] = c0.x;
  a[1] = c0.y;
  a[2] = c1.x;
  a[3] = c1.y;
}

// EXACT codebooks (qamw_mma.cu): acc[2 j + h][nt] += scale[2 j + h] times rows g (h = 0) and
// g + 8 (h = 1) of mma j's D, the weight rows of groups 2 j and 2 j + 1 times the high and the
// low part of the activation.
template <int NT>
__device__ __forceinline__ void add_scaled_pairs(float (&acc)[kMmaGroups][NT],
                                                 const float (&part)[kMmaGroups / 2][NT][4],
                                                 const float (&scale)[kMmaGroups]) {
#pragma unroll
  for (int j = 0; j < kMmaGroups / 2; ++j)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      acc[2 * j][nt] = fmaf(scale[2 * j], part[j][nt][0] + part[j][nt][1], acc[2 * j][nt]);
      acc[2 * j + 1][nt] =
          fmaf(scale[2 * j + 1], part[j][nt][2] + part[j][nt][3], acc[2 * j + 1][nt]);
    }
}

// Every warp's acc (row g of group i, batch row 4 nt + t) into shared memory, for the CTA's
// threads to add after the barrier this ends with: sums_s[((warp * kMmaGroups + i) * NT + nt)
// * 32 + lane]. Every thread calls it.
template <int NT>
__device__ __forceinline__ void stash_warp_sums(const float (&acc)[kMmaGroups][NT],
                                                float* sums_s) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kMmaGroups; ++i)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      sums_s[((warp * kMmaGroups + i) * NT + nt) * 32 + lane] = acc[i][nt];
  __syncthreads();
}

// Ends a row step of the CTA: every warp's acc (row g of group i, batch row 4 nt + t) added in
// shared memory, and out[b * m + row0 + r] = factor * sum for the rows below `end` and the
// batch rows below `batch`, consecutive threads on consecutive rows. Every thread calls it.
template <int NT, int WARPS>
__device__ void store_row_sums(const float (&acc)[kMmaGroups][NT], float* sums_s, int64_t row0,
                               int64_t end, int64_t m, int batch, float factor, void* out,
                               DType dtype) {
  stash_warp_sums<NT>(acc, sums_s);
  for (int o = threadIdx.x; o < kMmaRowsPerCta * batch; o += 32 * WARPS) {
    const int r = o % kMmaRowsPerCta, b = o / kMmaRowsPerCta;
    const int i = r / 8, src = (r % 8) * 4 + b % 4, nt = b / 4;
    float y = 0.0f;
#pragma unroll
    for (int v = 0; v < WARPS; ++v) y += sums_s[((v * kMmaGroups + i) * NT + nt) * 32 + src];
    if (row0 + r < end) store_from_float(out, dtype, b * m + row0 + r, factor * y);
  }
  __syncthreads();  // the sums are read before the next rows write them
}

// B tiles of 8 columns for `batch` (<= 16) rows: 1, 2 or 4.
inline int fragment_tiles(int64_t batch) { return batch <= 4 ? 1 : batch <= 8 ? 2 : 4; }

// mma steps of all k-blocks of n values.
template <int RUN>
int64_t fragment_steps(int64_t n) {
  return ceil_div(n / 2, 4 * RUN) * (RUN / 2);
}

// uint2 entries of the B fragments of one activation of `batch` rows.
template <int RUN>
int64_t fragment_entries(int64_t n, int64_t batch) {
  return fragment_steps<RUN>(n) * fragment_tiles(batch) * 32;
}

template <typename F>
void dispatch_tiles(int tiles, F&& f) {
  if (tiles == 1) f(IntC<1>{});
  else if (tiles == 2) f(IntC<2>{});
  else f(IntC<4>{});
}

// The mma step, and the lane column t, whose B registers hold pairs `pair` (even) and pair + 1.
template <int RUN>
__device__ __forceinline__ int64_t fragment_step(int64_t pair) {
  return pair / (4 * RUN) * (RUN / 2) + pair % RUN / 2;
}
template <int RUN>
__device__ __forceinline__ int fragment_t(int64_t pair) {
  return static_cast<int>(pair % (4 * RUN) / RUN);
}

// The entry of column `column` of activation z that holds pairs `pair` (even) and pair + 1.
template <int RUN>
__device__ __forceinline__ int64_t fragment_entry(int64_t pair, int column, int tiles,
                                                  int64_t steps, int64_t z) {
  return ((z * steps + fragment_step<RUN>(pair)) * tiles + column / 8) * 32 + column % 8 * 4 +
         fragment_t<RUN>(pair);
}

// Stores values 2 pair ... 2 pair + 3 (pair even) of batch row b of activation z: their high
// parts in column 2b, their low parts in column 2b + 1. The columns of batch rows past the last
// are never written: a column of B only reaches the same column of D.
template <int RUN>
__device__ __forceinline__ void store_fragment_pairs(uint2* frag, int64_t pair, int b,
                                                     const float (&v)[4], int tiles,
                                                     int64_t steps, int64_t z) {
  const uint2 p0 = split_pair(v[0], v[1]), p1 = split_pair(v[2], v[3]);
  frag[fragment_entry<RUN>(pair, 2 * b, tiles, steps, z)] = make_uint2(p0.x, p1.x);
  frag[fragment_entry<RUN>(pair, 2 * b + 1, tiles, steps, z)] = make_uint2(p0.y, p1.y);
}

// The fragments of activation z (x + z * x_stride, [batch][n], divided by channel_scale +
// z * n when given), for z < versions, a thread per 4 values (pairs past n up to the last
// k-block are zeros).
template <int RUN, typename T>
__global__ void __launch_bounds__(256)
    format_fragments_kernel(const T* x, int64_t x_stride, const float* channel_scale, int64_t n,
                            int batch, int tiles, int64_t steps, int64_t total, uint2* frag) {
  wait_for_prior_kernels();
  let_next_kernel_launch();
  const int64_t per_row = 4 * steps;  // groups of 4 values a row, up to the last k-block
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t d = i % per_row, b = i / per_row % batch, z = i / per_row / batch;
    const T* row = x + z * x_stride + b * n;
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = 4 * d + e;
      v[e] = j >= n ? 0.0f
             : channel_scale ? to_float(row[j]) / channel_scale[z * n + j]
                             : to_float(row[j]);
    }
    store_fragment_pairs<RUN>(frag, 2 * d, static_cast<int>(b), v, tiles, steps, z);
  }
}

template <int RUN>
void format_fragments(const void* x, DType dtype, int64_t x_stride, const float* channel_scale,
                      int versions, int64_t n, int64_t batch, uint2* frag, cudaStream_t stream) {
  const int64_t steps = fragment_steps<RUN>(n), total = versions * batch * 4 * steps;
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_overlapped(format_fragments_kernel<RUN, T>, dim3(capped_grid(ceil_div(total, 256))),
                      256, 0, stream, static_cast<const T*>(x), x_stride, channel_scale, n,
                      static_cast<int>(batch), fragment_tiles(batch), steps, total, frag);
  });
}

}  // namespace qamw::cuda
