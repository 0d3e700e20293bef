// QAM-W fused GEMV and dequantize on the GPU.
//
// GEMV: y[b, i] = sum_k scale(i, k) <codebook[code(i, k)], xr[b, 2k:2k+2]>, xr the rotated
// activation H_block(signs * x / channel_scale). At batch 1 each CTA first rotates the whole
// activation into shared memory (fused; when it fits); otherwise, and at larger batches, the
// launcher rotates it into the caller's workspace with a small kernel and the GEMV reads it
// through L1. The codebook is staged in shared memory (half2 for bf16 activations, float2 for
// the others unless fp16 holds every codeword exactly, as it holds new layers': half2 then,
// twice the copies in the same bytes), in copies that spread the lookups over the banks
// (codebook_copies).
// A block of K * 2^m (hadamard_tables.h) is rotated as the Walsh-Hadamard transform of its runs
// of 2^m values, then its K runs mixed by H_K (mix_shared).
// Then a thread decodes a "unit" of codes at a time, with compile-time shifts: 128 consecutive
// codes of one row (a chunk, exactly `bits` aligned 16-byte vectors), or at batch 1 the same 64
// codes of two rows, so that each activation pair read serves two codes (rows_per_lane). A
// power-of-two group of lanes shares the row(s) and reduces with shuffles. CTAs are persistent
// (one wave) and stride over rows, so each rotates the activation once for many rows. A unit
// inside the row whose pairs share one row scale is decoded without a branch; a row's last,
// partial unit, and scales over fewer pairs than a unit, take a general loop.
//
// The rotated activation is stored with two padding floats after every unit: lanes of a group
// read pairs a unit apart, which would otherwise all hit the same shared-memory bank.
#include <type_traits>

#include "../hadamard_tables.h"
#include "mma.cuh"
#include "qamw.cuh"

namespace qamw::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 128;                     // codes a thread decodes at once
constexpr int64_t kFusedActivationBytes = 64 * 1024;
constexpr int kRotateTile = 2048;               // floats a rotation CTA handles at least

float inv_sqrt(int64_t block) { return static_cast<float>(1.0 / __builtin_sqrt(double(block))); }

// Codewords as the GEMV holds them: half2 for bf16 activations, float2 for fp16 and fp32 ones
// (half2 too at batch 1 where that rounds nothing: qamw_gemv_kernel).
// A half2 load is 4 bytes, so a warp's lookups take one wavefront instead of two and twice the
// copies fit. Rounding a codeword to fp16 changes it by up to 2^-11 relative, 1/4 of a bf16
// output's own rounding; against an fp16 output's it is as large, and on an H100 two of the
// op tests' fp16 cases then erred by just over twice PyTorch's own rounding.
__device__ __forceinline__ void to_codeword(float a, float b, float2* c) {
  *c = make_float2(a, b);
}
__device__ __forceinline__ void to_codeword(float a, float b, __half2* c) {
  *c = __floats2half2_rn(a, b);
}
__device__ __forceinline__ float2 codeword_value(float2 c) { return c; }
__device__ __forceinline__ float2 codeword_value(__half2 c) { return __half22float2(c); }

struct GemvParams {
  const int32_t* packed;
  int64_t words_per_row;
  const float* codebook;
  const float* row_scale;
  int64_t scales_per_row;
  int seg_log2;       // log2 of the pairs sharing one row scale (n / scales_per_row / 2)
  int64_t m;
  int pairs, units_per_row, group_lanes;
  RotationArgs rot;        // the activation and its rotation
  DType dtype;             // of the output (and the activation)
  int batch;
  const float* workspace;  // rotated activation, or nullptr: rotate into shared memory
  int64_t workspace_stride;  // floats from one sibling's rotated activation to the next's (0:
                             // they share one)
  void* out;
  bool packed_vec;         // packed rows are 16-byte aligned
  int copies_log2;         // log2 of the codebook's copies in shared memory
  CtaSplit split;          // the CTAs of each sibling (one for a plain weight)
};

// Unit u of `row`, a whole one: 128 / R codes in 4 * BITS / R words, read as BITS 16-byte
// (R = 1) or 8-byte (R = 2) loads. Rows past the last read as zeros.
template <int BITS, int R>
__device__ __forceinline__ void load_unit(const GemvParams& p, int64_t row, int u,
                                          uint32_t (&w)[4 * BITS / R]) {
  constexpr int kVec = 4 / R;  // words a load
  if (row >= p.m) {
#pragma unroll
    for (int k = 0; k < 4 * BITS / R; ++k) w[k] = 0;
    return;
  }
  const uint32_t* src = reinterpret_cast<const uint32_t*>(p.packed) + row * p.words_per_row +
                        int64_t{u} * (4 * BITS / R);
#pragma unroll
  for (int v = 0; v < BITS; ++v) {
    uint32_t* q = w + kVec * v;
    if (!p.packed_vec) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) q[k] = __ldg(src + kVec * v + k);
    } else if constexpr (R == 1) {
      const uint4 t = __ldg(reinterpret_cast<const uint4*>(src) + v);
      q[0] = t.x;
      q[1] = t.y;
      q[2] = t.z;
      q[3] = t.w;
    } else {
      const uint2 t = __ldg(reinterpret_cast<const uint2*>(src) + v);
      q[0] = t.x;
      q[1] = t.y;
    }
  }
}

// Prefetches unit u of rows row .. row + R - 1 into L2 (BITS * 16 / R bytes each: one or two
// lines), those that exist: the loads of the unit then wait for L2, not DRAM.
template <int BITS, int R>
__device__ __forceinline__ void prefetch_unit(const GemvParams& p, int64_t row, int u) {
  if (u >= p.units_per_row) return;
  constexpr int kWords = 4 * BITS / R;
  const int64_t first = int64_t{u} * kWords;
  const int64_t last = first + kWords - 1 < p.words_per_row ? first + kWords - 1
                                                             : p.words_per_row - 1;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (row + r >= p.m) return;
    const int32_t* rowp = p.packed + (row + r) * p.words_per_row;
    prefetch_l2(rowp + first);
    prefetch_l2(rowp + last);
  }
}


// Batch 1 asks for two CTAs an SM: ptxas then fits two rows a lane in 128 registers without
// spilling (left free it took up to 168, one CTA an SM). Larger batches ask for one: without a
// minimum, ptxas capped some variants at 64 registers and spilled.
// At batch 1 (NB == 1) the rotated activation is always in shared memory, rotated by the CTA;
// larger batches read it from the workspace (L1 / L2). Each is then one address space, so the
// main loop's activation loads are shared (or global) loads, not generic ones.
template <int BITS, int NB, typename Codeword>
__global__ void __launch_bounds__(kThreads, NB == 1 ? 2 : 1) qamw_gemv_kernel(GemvParams p) {
  constexpr int R = rows_per_lane(NB);  // NB is 1 exactly when the batch is 1: half a chunk
                                        // (64 codes) of each of two rows
  constexpr int kUnit = kChunk / R, kUnitLog2 = R == 1 ? 7 : 6;
  constexpr int kRun = 32, kRuns = kUnit / kRun;  // a run's codes fill exactly BITS words
  constexpr bool kSharedX = NB == 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int G = p.group_lanes, units = p.units_per_row;
  const LaneRows lr(G, R);
  const int sub = lr.sub, row_in_cta = lr.row_in_cta;
  // The CTA serves one sibling's rows, below rows.end, with that sibling's channel scale. A
  // lane's last rows may be the next sibling's: they are read (the loads stay below m) but
  // never stored.
  const CtaRows rows = cta_rows(p.split, lr.rows_per_cta);
  // The first codes travel from DRAM while the kernel before this one finishes and the CTA
  // stages the codebook and the activation.
  prefetch_unit<BITS, R>(p, rows.first + row_in_cta, sub);
  wait_for_prior_kernels();

  const int copies_log2 = p.copies_log2;
  float* xr_s = reinterpret_cast<float*>(smem_raw + (sizeof(Codeword) << (BITS + copies_log2)));
  // At batch 1 (where CUDA cores are the default), float2 codewords that fp16 holds exactly
  // (new layers', codebooks.py) are staged as half2: twice the copies in the same bytes, half
  // the bytes a lookup, nothing rounded. (Larger batches would spill with both loops.)
  constexpr bool kMayHalve = std::is_same_v<Codeword, float2> && NB == 1;
  bool halved = false;
  if constexpr (kMayHalve) {
    bool inexact = false;
    for (int e = threadIdx.x; e < (2 << BITS); e += kThreads) {
      const float v = __ldg(p.codebook + e);
      inexact |= __half2float(__float2half_rn(v)) != v;
    }
    halved = __syncthreads_or(inexact) == 0;
  }
  const auto stage = [&](auto* table, int log2) {
    // Each warp's lanes write consecutive copies of one entry: its loads are one broadcast.
#pragma unroll 8
    for (int i = threadIdx.x; i < (1 << (BITS + log2)); i += kThreads) {
      const int e = i >> log2;
      to_codeword(__ldg(p.codebook + 2 * e), __ldg(p.codebook + 2 * e + 1), table + i);
    }
  };
  if (halved)
    stage(reinterpret_cast<__half2*>(smem_raw), copies_log2 + 1);
  else
    stage(reinterpret_cast<Codeword*>(smem_raw), copies_log2);
  // Rotated activation: pair k of batch row b at xr2[b * xr_row + unit * xr_unit + k % kUnit].
  // In shared memory each unit is followed by one padding pair: the lanes of a row read pairs
  // a unit apart, which would otherwise all hit the same banks.
  const float2* xr2;
  int xr_row, xr_unit;
  if constexpr (kSharedX) {
    const int pad_shift = kUnitLog2 + 1;  // in floats
    xr_row = p.pairs + units;
    rotate_into_shared(p.rot, rows.sibling, xr_s, pad_shift);
    xr2 = reinterpret_cast<const float2*>(xr_s);
    xr_unit = kUnit + 1;
  } else {
    __syncthreads();  // the codebook is staged
    xr2 = reinterpret_cast<const float2*>(p.workspace + rows.sibling * p.workspace_stride);
    xr_row = p.pairs;
    xr_unit = kUnit;
  }

  // Units whose pairs share one row scale and are all inside the row are decoded run by run,
  // without a branch; the rest (a row's last, partial unit; scales over fewer pairs than a
  // unit) by the general loop.
  const int fast_units = p.seg_log2 >= kUnitLog2 ? p.pairs >> kUnitLog2 : 0;
  let_next_kernel_launch();

  // The rows' loop, compiled for each kind of codeword this kernel stages.
  const auto decode_rows = [&](auto* table) {
    using Word = std::remove_pointer_t<decltype(table)>;
    const LaneCopy<Word> codebook(table, copies_log2 + (sizeof(Word) < sizeof(Codeword)));
    for (int64_t row0 = rows.first; row0 < rows.end; row0 += rows.stride) {
      const int64_t row = row0 + row_in_cta;
      float acc[R][NB];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int b = 0; b < NB; ++b) acc[r][b] = 0.0f;
      if (row < rows.end) {
        for (int u = sub; u < units; u += G) {
          // One unit ahead: the next of these rows, or the first of the next ones.
          if (u + G < units) prefetch_unit<BITS, R>(p, row, u + G);
          else prefetch_unit<BITS, R>(p, row + rows.stride, sub);
          const float2* xu = xr2 + u * xr_unit;
          if (u < fast_units) {
            const int segment = (u * kUnit) >> p.seg_log2;
            float scale[R];
#pragma unroll
            for (int r = 0; r < R; ++r)
              scale[r] = row + r < p.m ? p.row_scale[(row + r) * p.scales_per_row + segment] : 0.0f;
            float part[R][NB];
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
              for (int b = 0; b < NB; ++b) part[r][b] = 0.0f;
            // The unit in runs of 32 codes, each exactly BITS words, in a rolled loop: unrolled,
            // a unit of two rows was ~18 KiB of SASS, and its warps waited on instruction fetch
            // (Nsight Compute, NOTES GPU v8). The run decoded is always the first BITS words:
            // after each, the rest move down.
            uint32_t w[R][4 * BITS / R];
#pragma unroll
            for (int r = 0; r < R; ++r) load_unit<BITS, R>(p, row + r, u, w[r]);
#pragma unroll 1
            for (int run = 0; run < kRuns; ++run) {
              const float2* xs = xu + run * kRun;
#pragma unroll
              for (int j = 0; j < kRun; ++j) {
                float2 cw[R];
#pragma unroll
                for (int r = 0; r < R; ++r)
                  cw[r] = codeword_value(codebook[chunk_code<BITS>(w[r], j)]);
#pragma unroll
                for (int b = 0; b < NB; ++b) {
                  if (NB == 1 || b < p.batch) {
                    const float2 xv = kSharedX ? xs[b * xr_row + j] : __ldg(xs + b * xr_row + j);
#pragma unroll
                    for (int r = 0; r < R; ++r)
                      part[r][b] = fmaf(cw[r].x, xv.x, fmaf(cw[r].y, xv.y, part[r][b]));
                  }
                }
              }
              if (run + 1 < kRuns) {
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                  for (int k = 0; k + BITS < 4 * BITS / R; ++k) w[r][k] = w[r][k + BITS];
              }
            }
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
              for (int b = 0; b < NB; ++b) acc[r][b] = fmaf(scale[r], part[r][b], acc[r][b]);
          } else {
            // Pair by pair, codes and scales read from global memory.
            const int first = u * kUnit;
            const int valid = p.pairs - first < kUnit ? p.pairs - first : kUnit;
#pragma unroll
            for (int r = 0; r < R; ++r) {
              if (row + r >= p.m) continue;
              const uint32_t* rowp =
                  reinterpret_cast<const uint32_t*>(p.packed) + (row + r) * p.words_per_row;
              const float* scales = p.row_scale + (row + r) * p.scales_per_row;
              for (int j = 0; j < valid; ++j) {
                const float2 cw =
                    codeword_value(codebook[packed_code(rowp, first + j, BITS)]);
                const float scale = scales[(first + j) >> p.seg_log2];
#pragma unroll
                for (int b = 0; b < NB; ++b) {
                  if (NB == 1 || b < p.batch) {
                    const float2 xv = xu[b * xr_row + j];
                    acc[r][b] = fmaf(scale, fmaf(cw.x, xv.x, cw.y * xv.y), acc[r][b]);
                  }
                }
              }
            }
          }
        }
      }
      // Every lane gets here: the loop over row0 is uniform across the CTA.
      reduce_and_store(acc, G, sub, row, rows.end, p.m, p.batch, 1.0f, p.out, p.dtype);
    }
  };
  if constexpr (kMayHalve) {
    if (halved) return decode_rows(reinterpret_cast<__half2*>(smem_raw));
  }
  decode_rows(reinterpret_cast<Codeword*>(smem_raw));
}

// Where rotate_kernel writes: fp32 rows into the workspace, or (frag not null) the tensor-core
// GEMV's B fragments (mma.cuh), zeros past n up to the last k-block.
struct RotateOut {
  float* xr;
  uint2* frag;
  int tiles;
  int64_t steps;
};

// Rotates `tile` values (whole blocks of order * pow2) of activation row blockIdx.y, divided by
// the channel scale of sibling z (a fused weight's siblings each get their own rotated
// activation): grid (n / tile, batch, siblings). For fragments, tiles hold whole pairs of
// pairs (tile % 4 == 0).
__global__ void __launch_bounds__(kThreads)
    rotate_kernel(const void* x, DType dtype, int n, int order, int pow2, int table, int tile,
                  const float* channel_scale, const int8_t* signs, float norm, bool vec,
                  RotateOut o) {
  extern __shared__ float tile_s[];
  wait_for_prior_kernels();
  let_next_kernel_launch();  // the GEMV, which prefetches its codes while this runs
  const int b = blockIdx.y, z = blockIdx.z;
  const int64_t first = int64_t{b} * n + int64_t{blockIdx.x} * tile;
  const int j0 = blockIdx.x * tile;
  if (o.frag && blockIdx.x + 1 == gridDim.x) {  // the row's last CTA: zeros past n
    const float zeros[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t d = n / 4 + threadIdx.x; d < 4 * o.steps; d += kThreads)
      store_fragment_pairs<kQamwMmaRun>(o.frag, 2 * d, b, zeros, o.tiles, o.steps, z);
  }
  const RotationArgs r{static_cast<const char*>(x) + first * dtype_bytes(dtype),
                       dtype,
                       tile,
                       channel_scale ? channel_scale + int64_t{z} * n + j0 : nullptr,
                       signs ? signs + j0 : nullptr,
                       norm,
                       vec,
                       order,
                       pow2,
                       table};
  rotate_into_shared(r, 0, tile_s, kNoPadding);
  if (o.frag) {
    for (int d = threadIdx.x; d < tile / 4; d += kThreads) {
      const float v[4] = {tile_s[4 * d], tile_s[4 * d + 1], tile_s[4 * d + 2], tile_s[4 * d + 3]};
      store_fragment_pairs<kQamwMmaRun>(o.frag, j0 / 2 + 2 * d, b, v, o.tiles, o.steps, z);
    }
  } else {
    float* xr = o.xr + int64_t{z} * gridDim.y * n;
    for (int i = threadIdx.x; i < tile; i += kThreads) xr[first + i] = tile_s[i];
  }
}

// Dequantizes one tile (a whole number of Hadamard blocks) of one row per iteration. The row is
// the rotated row times H, i.e. H^T applied to it: `table` holds the rows of H_order^T.
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(QamwWeight w, int order, int pow2, int table, int tile, float norm,
                      void* out, DType dtype) {
  extern __shared__ float tile_s[];
  const int64_t tiles_per_row = w.n / tile, tiles = w.m * tiles_per_row;
  const int64_t pairs_per_scale = w.n / 2 / w.scales_per_row;
  const int pieces = tile % 8 == 0 ? tile / 8 : 0;
  const int piece_bits = pieces ? staging_bits(pow2, tile) : 0;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t row = t / tiles_per_row, j0 = (t - row * tiles_per_row) * tile;
    const uint32_t* rowp = reinterpret_cast<const uint32_t*>(w.packed) + row * w.words_per_row;
    __syncthreads();  // the previous tile's reads are done
    // Pieces of 4 codewords (8 values) a lane, their low index bits transformed on the way in
    // (transform_and_store_piece); a tile that is not a whole number of pieces, pair by pair.
    const int lane = threadIdx.x % 32;
    for (int w0 = threadIdx.x - lane; w0 < pieces; w0 += kThreads) {
      const int piece = w0 + lane;
      float v[8] = {};
      float* piece_dst = nullptr;  // an idle lane
      if (piece < pieces) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t k = j0 / 2 + 4 * piece + c;
          const uint32_t code = packed_code(rowp, k, w.bits);
          const float scale = w.row_scale[row * w.scales_per_row + k / pairs_per_scale] * norm;
          v[2 * c] = w.codebook[2 * code] * scale;
          v[2 * c + 1] = w.codebook[2 * code + 1] * scale;
        }
        piece_dst = tile_s + 8 * piece;
      }
      transform_and_store_piece(v, piece_bits, piece_dst);
    }
    for (int i = 4 * pieces + threadIdx.x; i < tile / 2; i += kThreads) {
      const int64_t k = j0 / 2 + i;
      const uint32_t code = packed_code(rowp, k, w.bits);
      const float scale = w.row_scale[row * w.scales_per_row + k / pairs_per_scale] * norm;
      tile_s[2 * i] = w.codebook[2 * code] * scale;
      tile_s[2 * i + 1] = w.codebook[2 * code + 1] * scale;
    }
    __syncthreads();
    fwht_shared(tile_s, 1, tile, pow2, tile, kNoPadding, piece_bits);
    if (order > 1) mix_shared(tile_s, 1, tile, order, pow2, table, tile, kNoPadding);
    for (int i = threadIdx.x; i < tile; i += kThreads) {
      const int64_t j = j0 + i;
      float v = tile_s[i];
      if (w.signs) v *= static_cast<float>(w.signs[j]);
      if (w.channel_scale) v /= w.channel_scale[j];
      store_from_float(out, dtype, row * w.n + j, v);
    }
  }
}

// Global-memory steps for Hadamard blocks whose tile does not fit in shared memory (e.g. a
// whole-dimension block of 28672 on a GPU with 99 KiB per block): the rotation is then the
// hadamard op's kernels, in place.

// ws[i] = x[i] / channel_scale[i % n] * signs[i % n], as fp32, for the workspace rotation.
__global__ void __launch_bounds__(kThreads)
    prescale_kernel(const void* x, DType dtype, int64_t total, int64_t n,
                    const float* channel_scale, const int8_t* signs, float* ws) {
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kThreads) {
    const int64_t j = i % n;
    float v = load_as_float(x, dtype, i);
    if (channel_scale) v /= channel_scale[j];
    if (signs) v *= static_cast<float>(signs[j]);
    ws[i] = v;
  }
}

// The rotated rows of the weight (codeword times row scale), not yet rotated back.
__global__ void __launch_bounds__(kThreads) codewords_kernel(QamwWeight w, void* out, DType dtype) {
  const int64_t pairs_per_row = w.n / 2, total = w.m * pairs_per_row;
  const int64_t pairs_per_scale = pairs_per_row / w.scales_per_row;
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kThreads) {
    const int64_t row = i / pairs_per_row, k = i - row * pairs_per_row;
    const uint32_t* rowp = reinterpret_cast<const uint32_t*>(w.packed) + row * w.words_per_row;
    const uint32_t code = packed_code(rowp, k, w.bits);
    const float scale = w.row_scale[row * w.scales_per_row + k / pairs_per_scale];
    store_from_float(out, dtype, 2 * i, w.codebook[2 * code] * scale);
    store_from_float(out, dtype, 2 * i + 1, w.codebook[2 * code + 1] * scale);
  }
}

// out[i] /= channel_scale[i % n].
__global__ void __launch_bounds__(kThreads)
    divide_columns_kernel(void* out, DType dtype, int64_t total, int64_t n,
                          const float* channel_scale) {
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kThreads)
    store_from_float(out, dtype, i, load_as_float(out, dtype, i) / channel_scale[i % n]);
}

unsigned elementwise_grid(int64_t total) { return capped_grid(ceil_div(total, kThreads)); }

// A tile of block * 2^t values dividing n: the largest up to kRotateTile, or one block.
int rotate_tile(int64_t n, int64_t block) {
  int64_t t = block;
  while (2 * t <= kRotateTile && n % (2 * t) == 0) t *= 2;
  return static_cast<int>(t);
}

}  // namespace

// Accumulators for 1, 4 or 16 activation rows: extra rows are idle registers, not traffic.
template <typename F>
void dispatch_gemv_batch(int64_t batch, F&& f) {
  if (batch <= 1) f(IntC<1>{});
  else if (batch <= 4) f(IntC<4>{});
  else f(IntC<16>{});
}

int64_t qamw_gemv_workspace_floats(const QamwWeight& w, int64_t batch) {
  return w.siblings.count * (batch * w.n + 2 * fragment_entries<kQamwMmaRun>(w.n, batch));
}

void qamw_gemv(const QamwWeight& w, const void* x, DType dtype, int64_t batch, void* out,
               float* workspace, void* stream) {
  if (batch == 0 || w.m == 0) return;
  const cudaStream_t s = as_stream(stream);
  GemvParams p{};
  p.packed = w.packed;
  p.words_per_row = w.words_per_row;
  p.codebook = w.codebook;
  p.row_scale = w.row_scale;
  p.scales_per_row = w.scales_per_row;
  p.seg_log2 = log2_of(w.n / 2 / w.scales_per_row);
  p.m = w.m;
  p.pairs = static_cast<int>(w.n / 2);
  const HadamardSplit split = split_hadamard_block(w.block);
  p.rot = RotationArgs{x,
                       dtype,
                       static_cast<int>(w.n),
                       w.channel_scale,
                       w.signs,
                       inv_sqrt(w.block),
                       stage_vectors(x, w.channel_scale, w.signs, w.n),
                       static_cast<int>(split.order),
                       static_cast<int>(split.pow2),
                       hadamard_mask_offset(split.order, false)};
  p.dtype = dtype;
  p.batch = static_cast<int>(batch);
  p.out = out;
  p.packed_vec = aligned16(w.packed);

  const int optin = shared_per_block_optin();
  // At batch 1 each CTA rotates the activation into shared memory, beside the codebook copies,
  // when both fit (unless QAMW_GEMV_ROTATE_ONCE=1). Otherwise, and at larger batches, a small
  // kernel rotates it once into the workspace, and a batch of 1 runs the kernel for batches up
  // to 4.
  const int64_t fused_units = ceil_div(p.pairs, kChunk / rows_per_lane(1));
  const int64_t xr_bytes = int64_t{sizeof(float)} * (w.n + 2 * fused_units);
  const int entry_bytes = dtype == DType::BF16 ? sizeof(__half2) : sizeof(float2);
  // Two CTAs an SM where the copies allow it: the copies get what half an SM's shared memory
  // leaves beside `other` bytes, or where not one copy fits there, what a whole SM's leaves.
  const int64_t half_sm = shared_per_block_two_an_sm();
  const auto copies_beside = [&](int64_t other) {
    const int c = codebook_copies(w.bits, entry_bytes, half_sm - other);
    return c > 0 ? c : codebook_copies(w.bits, entry_bytes, optin - other);
  };
  const bool mma = qamw_use_mma(w, batch);  // qamw_mma.cu
  const bool in_cta = batch == 1 && rotate_in_each_cta();
  // Tensor cores at batch 1 rotate in each CTA too, where the activation fits.
  if (mma && in_cta && qamw_gemv_mma_fused(w, p.rot, out, dtype, s)) return;
  int copies = !mma && in_cta && xr_bytes <= kFusedActivationBytes ? copies_beside(xr_bytes) : 0;
  const bool fused = copies > 0;
  if (!fused) copies = copies_beside(0);
  p.copies_log2 = log2_of(copies);
  const int64_t kernel_batch = fused ? 1 : (batch < 2 ? int64_t{2} : batch);
  p.units_per_row = static_cast<int>(ceil_div(p.pairs, kChunk / rows_per_lane(kernel_batch)));
  p.group_lanes = gemv_group_lanes(p.units_per_row, kernel_batch);
  const size_t cb_bytes = size_t(entry_bytes) * copies << w.bits;
  const size_t smem = cb_bytes + (fused ? xr_bytes : 0);
  // One rotated activation per sibling, each divided by its own channel scale; without
  // channel scales, one for all. The tensor-core kernel's B fragments follow them in the
  // workspace (qamw_gemv_workspace_floats).
  const int rotations = w.channel_scale ? w.siblings.count : 1;
  uint2* fragments =
      mma ? reinterpret_cast<uint2*>(workspace + w.siblings.count * batch * w.n) : nullptr;
  bool formatted = false;
  if (!fused) {
    const int tile = rotate_tile(w.n, w.block);
    const size_t tile_bytes = sizeof(float) * tile;
    p.workspace_stride = rotations > 1 ? batch * w.n : 0;
    if (allow_smem(rotate_kernel, tile_bytes)) {
      // For tensor cores, the rotation writes the fragments where its tiles hold whole pairs
      // of pairs (every tile but of blocks of 2 in rows of 4 k + 2 values).
      formatted = mma && tile % 4 == 0;
      const RotateOut o{workspace, formatted ? fragments : nullptr, fragment_tiles(batch),
                        fragment_steps<kQamwMmaRun>(w.n)};
      launch_overlapped(rotate_kernel,
                        dim3(static_cast<unsigned>(w.n / tile), static_cast<unsigned>(batch),
                             static_cast<unsigned>(rotations)),
                        kThreads, tile_bytes, s, x, dtype, p.rot.n, p.rot.order, p.rot.pow2,
                        p.rot.table, tile, w.channel_scale, w.signs, p.rot.norm,
                        p.rot.vec && tile % 8 == 0, o);
    } else {
      for (int r = 0; r < rotations; ++r) {
        float* xr = workspace + r * batch * w.n;
        prescale_kernel<<<elementwise_grid(batch * w.n), kThreads, 0, s>>>(
            x, dtype, batch * w.n, w.n, w.channel_scale ? w.channel_scale + r * w.n : nullptr,
            w.signs, xr);
        hadamard(xr, xr, DType::F32, batch, w.n, w.block, nullptr, false, s);
      }
    }
    p.workspace = workspace;
  }
  if (mma) {
    if (!formatted)
      format_fragments<kQamwMmaRun>(workspace, DType::F32, p.workspace_stride, nullptr,
                                    rotations, w.n, batch, fragments, s);
    qamw_gemv_mma(w, rotations, batch, fragments, out, dtype, s);
    return;
  }
  const int64_t rows_per_cta =
      gemv_rows_per_cta(kThreads, p.group_lanes, rows_per_lane(kernel_batch));
  const auto launch = [&](auto kernel) {
    launch_gemv(kernel, kThreads, smem, w.siblings, w.m, rows_per_cta, s, p);
  };
  dispatch_qamw_bits(w.bits, [&](auto bits) {
    dispatch_gemv_batch(kernel_batch, [&](auto nb) {
      constexpr int kBits = decltype(bits)::value, kRows = decltype(nb)::value;
      if (dtype == DType::BF16) launch(qamw_gemv_kernel<kBits, kRows, __half2>);
      else launch(qamw_gemv_kernel<kBits, kRows, float2>);
    });
  });
}

void qamw_dequantize(const QamwWeight& w, void* out, DType dtype, void* stream) {
  if (w.m == 0 || w.n == 0) return;
  if (w.siblings.count > 1)
    return dequantize_each_sibling(w, dtype, out, [&](const QamwWeight& v, void* rows) {
      qamw_dequantize(v, rows, dtype, stream);
    });
  const int tile = rotate_tile(w.n, w.block);
  const size_t smem = sizeof(float) * tile;
  const cudaStream_t s = as_stream(stream);
  if (!allow_smem(dequantize_kernel, smem)) {
    // The rotated rows, rotated back by the hadamard op's kernels (H^T, then the signs).
    codewords_kernel<<<elementwise_grid(w.m * w.n / 2), kThreads, 0, s>>>(w, out, dtype);
    hadamard(out, out, dtype, w.m, w.n, w.block, w.signs, true, s);
    if (w.channel_scale)
      divide_columns_kernel<<<elementwise_grid(w.m * w.n), kThreads, 0, s>>>(
          out, dtype, w.m * w.n, w.n, w.channel_scale);
    return;
  }
  const int64_t tiles = w.m * (w.n / tile);
  const unsigned grid = capped_grid(tiles);
  const HadamardSplit split = split_hadamard_block(w.block);
  dequantize_kernel<<<grid, kThreads, smem, s>>>(
      w, static_cast<int>(split.order), static_cast<int>(split.pow2),
      hadamard_mask_offset(split.order, true), tile, inv_sqrt(w.block), out, dtype);
}

}  // namespace qamw::cuda
