// QAM-W GEMV on tensor cores, for batches of 2 to 16 and, at 8 bits, 1 (any width on request,
// QAMW_GEMV_MMA).
//
// A QAM-W code is a pair of weights along k, and a pair of bf16 values is exactly one register
// of an mma.m16n8k16 A fragment: a lane looks its codes up in a shared-memory codebook and hands
// the codewords to the tensor cores as they are. The decode then costs the same at batch 16 as
// at batch 1, where the CUDA-core kernel (qamw.cu) pays two FMAs per code for every batch row.
//
// Exactness: operands are bf16, so both are split into a high and a low bf16 part (mma.cuh).
// The weight's parts are A rows: rows g and g + 8 of a tile are the high and low parts of one
// weight row, so that one 8-byte lookup of a (hi, lo) codeword fills two registers of the
// fragment as they are. The four D values a lane holds (rows g, g + 8; columns 2t, 2t + 1: the
// activation's high and low parts) are then the four partial products of one output: their sum
// has the error of an fp32 dot product, whatever the activation's dtype. A codebook of bf16
// pairs (new layers') has no low parts: a CTA that finds one stages 4-byte entries (twice the
// copies in the same bytes) and takes rows g and g + 8 for two weight rows, each lookup filling
// one register (EXACT): half the lookup bytes and half the mmas a k-block.
//
// Layout: k-blocks of 128 pairs, a lane's run 32 codes of row g of each group of 8 rows
// (mma.cuh, RUN = 32): exactly BITS packed words, loaded whole, their shifts compile-time.
//
// Work is split as mma.cuh says. Each k-block applies its rows' scale after its 16 steps where
// a row scale covers whole k-blocks. Scales over 32 or 64 pairs (Hadamard blocks of 64 and
// 128) change inside the k of one mma step, which the mma sums over, so they enter A instead
// (SCALED): the codebook holds float pairs, and a lane multiplies its codeword by its run's
// scale (a run of 32 pairs lies in one segment) and splits the product before the mma.
//
// At batch 1 each CTA rotates the activation into shared memory itself (FUSED), as the CUDA-core
// kernel does, and rewrites it in place as its B registers: a batch of one has only columns 0
// and 1 (the high and low parts), so a step's B is 8 entries, read by lanes 0-7 (the others
// hold zeros). One launch, where the rotation kernel and its fragments in global memory take
// two. On sm_90 the CTAs of a FUSED launch run in thread-block clusters of 4 (CLUSTER) that
// share 128 rows and split their k-blocks in runs of whole Hadamard blocks, so that each CTA
// rotates a quarter of the activation; the partial sums meet in distributed shared memory.
#include <algorithm>
#include <numeric>

#include "mma.cuh"
#include "qamw.cuh"

namespace qamw::cuda {
namespace {

constexpr int kBlockPairs = 128;            // pairs of a k-block
constexpr int kRunCodes = kQamwMmaRun;      // codes a lane decodes per row and k-block
constexpr int kSteps = kRunCodes / 2;       // mma steps per k-block

struct MmaParams {
  const int32_t* packed;
  int64_t words_per_row;
  const float* codebook;
  int copies_log2;        // log2 of the codebook's copies in shared memory
  const float* row_scale;
  int64_t scales_per_row;
  int seg_log2;           // log2 of the pairs sharing one row scale (>= 5), or 30: one a row
  int64_t m;
  int kblocks;
  // A cluster of CLUSTER CTAs shares 32 * CLUSTER rows and splits their k-blocks in `granules`
  // runs of granule_kblocks (whole Hadamard blocks, split_runs); without one, a run of all.
  int granules, granule_kblocks;
  const uint2* fragments;
  int64_t fragments_stride;  // entries from one sibling's fragments to the next's (0: shared)
  RotationArgs rot;          // FUSED: the activation each CTA rotates
  int batch;
  void* out;
  DType dtype;
  CtaSplit split;
};

// The BITS words of a lane's run of 32 codes: words [kb * 4 * BITS + t * BITS, + BITS) of the
// row at `row_words` (a row below m: the caller clamps it), by the widest loads their
// alignment allows (the launcher takes only 16-byte aligned codes). A vector past the row (the
// last k-block's lanes past n) is read from the row's last vector instead: B is zero past n,
// so whatever it decodes to adds nothing, and the loop has no branch.
template <int BITS>
__device__ __forceinline__ void load_run(const uint32_t* row_words, int words_per_row, int kb,
                                         int t, uint32_t (&w)[BITS]) {
  constexpr int kVec = BITS % 4 == 0 ? 4 : BITS % 2 == 0 ? 2 : 1;
  const int first = kb * 4 * BITS + t * BITS;
#pragma unroll
  for (int v = 0; v < BITS / kVec; ++v) {
    const int word = std::min(first + kVec * v, words_per_row - kVec);
    if constexpr (kVec == 4) {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(row_words + word));
      w[4 * v] = q.x;
      w[4 * v + 1] = q.y;
      w[4 * v + 2] = q.z;
      w[4 * v + 3] = q.w;
    } else if constexpr (kVec == 2) {
      const uint2 q = __ldg(reinterpret_cast<const uint2*>(row_words + word));
      w[2 * v] = q.x;
      w[2 * v + 1] = q.y;
    } else {
      w[v] = __ldg(row_words + word);
    }
  }
}

// Asks L2 for a lane's run of k-block kb (BITS * 4 bytes: one or two lines) of the row at
// row_words, clamped into the row as load_run reads it.
template <int BITS>
__device__ __forceinline__ void prefetch_run(const uint32_t* row_words, int words_per_row,
                                             int kb, int t) {
  const int first = std::min(kb * 4 * BITS + t * BITS, words_per_row - BITS);
  prefetch_l2(row_words + std::max(first, 0));
  prefetch_l2(row_words + std::min(first + BITS, words_per_row) - 1);
}

// Values of the rotated activation a FUSED CTA holds (kblocks * 2 * kBlockPairs, 4 bytes each,
// as floats and then as B entries), at most.
constexpr int kFusedValues = 16384;

// Rewrites the rotated activation of a batch of one (xr: n floats, room for kblocks k-blocks)
// in place as its B registers: entry 8 S + 4 h + t holds part h (0: high, 1: low) of lane t's
// pairs of step S (mma.cuh's layout, columns 0 and 1), zeros past n. Every thread of the CTA's
// THREADS reads all its values before a barrier, then writes.
template <int THREADS>
__device__ void fragments_in_place(float* xr, int n, int kblocks) {
  constexpr int kFusedGroups = kFusedValues / 4 / THREADS;  // of 4 values a thread, at most
  const int groups = kblocks * kBlockPairs / 2;  // of 4 values: pairs 2 d and 2 d + 1
  uint2 high[kFusedGroups], low[kFusedGroups];
#pragma unroll
  for (int k = 0; k < kFusedGroups; ++k) {
    const int d = threadIdx.x + k * THREADS;
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = d < groups && 4 * d + e < n ? xr[4 * d + e] : 0.0f;
    const uint2 p0 = split_pair(v[0], v[1]), p1 = split_pair(v[2], v[3]);
    high[k] = make_uint2(p0.x, p1.x);
    low[k] = make_uint2(p0.y, p1.y);
  }
  __syncthreads();
  uint2* b = reinterpret_cast<uint2*>(xr);
#pragma unroll
  for (int k = 0; k < kFusedGroups; ++k) {
    const int d = threadIdx.x + k * THREADS;
    if (d < groups) {
      const int64_t entry = 8 * fragment_step<kRunCodes>(2 * d) + fragment_t<kRunCodes>(2 * d);
      b[entry] = high[k];
      b[entry + 4] = low[k];
    }
  }
  __syncthreads();
}

// Ends a row step of a cluster that splits the k-blocks of its 32 * cluster rows (batch 1): the
// CTA adds its warps' sums of each 32-row tile, then CTA r adds the cluster's sums of tile r,
// read from every CTA's shared memory (partial_s, 32 * cluster floats), and stores them. Every
// thread calls it.
template <int WARPS, int CLUSTER>
__device__ void store_cluster_sums(const float (&acc)[kMmaGroups][1], float* sums_s,
                                   float* partial_s, int64_t row0, int64_t end, void* out,
                                   DType dtype) {
  constexpr int kTileWarps = WARPS / CLUSTER;
  stash_warp_sums<1>(acc, sums_s);
  for (int o = threadIdx.x; o < kMmaRowsPerCta * CLUSTER; o += 32 * WARPS) {
    const int tile = o / kMmaRowsPerCta, r = o % kMmaRowsPerCta;
    const int i = r / 8, src = (r % 8) * 4;  // lane (g, 0) holds batch row 0 of row g
    float y = 0.0f;
#pragma unroll
    for (int v = tile * kTileWarps; v < (tile + 1) * kTileWarps; ++v)
      y += sums_s[(v * kMmaGroups + i) * 32 + src];
    partial_s[o] = y;
  }
  cluster_sync();
  if (threadIdx.x < kMmaRowsPerCta) {
    const int r = threadIdx.x;
    const unsigned rank = cluster_rank();
    float y = 0.0f;
#pragma unroll
    for (int q = 0; q < CLUSTER; ++q)
      y += cluster_shared(partial_s, q)[rank * kMmaRowsPerCta + r];
    const int64_t row = row0 + rank * kMmaRowsPerCta + r;
    if (row < end) store_from_float(out, dtype, row, y);
  }
  cluster_sync();  // every peer has read partial_s before the next rows write it, or CTAs exit
}

// NT: 8-column B tiles, each 4 batch rows (high and low parts); WARPS: mma_warps; CLUSTER: CTAs
// of a thread-block cluster that split the k-blocks of 32 * CLUSTER rows (FUSED, or 1).
template <int BITS, int NT, int WARPS, bool SCALED, bool FUSED, int CLUSTER>
__global__ void __launch_bounds__(32 * WARPS, mma_ctas_per_sm(WARPS, NT))
    qamw_gemv_mma_kernel(MmaParams p) {
  static_assert(CLUSTER == 1 || (FUSED && WARPS % CLUSTER == 0));
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  // The CTA's k-blocks [kb_first, kb_end): runs [r * granules / CLUSTER, (r + 1) * granules /
  // CLUSTER) at rank r; its warps split among the cluster's row tiles, kTileWarps a tile.
  constexpr int kTileWarps = WARPS / CLUSTER;
  const int tile = warp / kTileWarps, kb_warp = warp % kTileWarps;
  int kb_first = 0, kb_end = p.kblocks;
  if constexpr (CLUSTER > 1) {
    const int rank = static_cast<int>(cluster_rank());
    kb_first = rank * p.granules / CLUSTER * p.granule_kblocks;
    const int kb_last = (rank + 1) * p.granules / CLUSTER * p.granule_kblocks;
    if (kb_last < kb_end) kb_end = kb_last;
  }
  const CtaRows rows = cta_rows(p.split, kMmaRowsPerCta * CLUSTER, CLUSTER);
  // The lane's row of group i (of 8 rows) in the warp's tile of the rows from row0, clamped
  // below m: rows past m are read and decoded like the others, and never stored.
  const auto lane_row = [&](int64_t row0, int i) {
    const int64_t row = row0 + kMmaRowsPerCta * tile + 8 * i + g;
    return row < p.m ? row : p.m - 1;
  };
  const int words_per_row = static_cast<int>(p.words_per_row);
  const auto row_words = [&](int64_t row) {
    return reinterpret_cast<const uint32_t*>(p.packed) + row * words_per_row;
  };
#pragma unroll
  for (int i = 0; i < kMmaGroups; ++i)
    prefetch_run<BITS>(row_words(lane_row(rows.first, i)), words_per_row, kb_first + kb_warp, t);
  wait_for_prior_kernels();

  static_assert(!FUSED || NT == 1, "a fused rotation serves a batch of one");
  const int copies_log2 = p.copies_log2;
  uint2* cb_s = reinterpret_cast<uint2*>(smem_raw);
  float* sums_s = reinterpret_cast<float*>(smem_raw + (sizeof(uint2) << (BITS + copies_log2)));
  // FUSED: the CTA's sums for its cluster's tiles, then its k-blocks of the rotated activation.
  float* partial_s = sums_s + mma_sums_bytes(WARPS, NT) / sizeof(float);
  uint2* b_s = reinterpret_cast<uint2*>(partial_s + (CLUSTER > 1 ? kMmaRowsPerCta * CLUSTER : 0));
  // A codebook of bf16 pairs (new layers', codebooks.py) has no low parts: the CTA then stages
  // 4-byte entries, twice the copies in the same bytes, and decodes EXACT. It finds out from
  // the codebook itself, so any other codebook keeps its (high, low) pairs.
  bool exact = false;
  if constexpr (!SCALED) {
    uint32_t low_bits = 0;
    for (int e = threadIdx.x; e < (1 << BITS); e += 32 * WARPS)
      low_bits |= (__float_as_uint(__ldg(p.codebook + 2 * e)) |
                   __float_as_uint(__ldg(p.codebook + 2 * e + 1))) & 0xFFFFu;
    exact = __syncthreads_or(low_bits != 0) == 0;
  }
  // An 8-byte entry: the (high, low) parts, (SCALED) the float pair, or (exact) two adjacent
  // 4-byte copies of the bf16 pair.
#pragma unroll 4
  for (int i = threadIdx.x; i < (1 << (BITS + copies_log2)); i += 32 * WARPS) {
    const int e = i >> copies_log2;
    const float a = __ldg(p.codebook + 2 * e), b = __ldg(p.codebook + 2 * e + 1);
    const uint2 parts = split_pair(a, b);
    cb_s[i] = SCALED  ? make_uint2(__float_as_uint(a), __float_as_uint(b))
              : exact ? make_uint2(parts.x, parts.x)
                      : parts;
  }
  if constexpr (FUSED) {
    const int first = kb_first * 2 * kBlockPairs, end = kb_end * 2 * kBlockPairs;
    const int count = (end < p.rot.n ? end : p.rot.n) - first;
    rotate_into_shared(p.rot, rows.sibling, reinterpret_cast<float*>(b_s), kNoPadding, first,
                       count);
    fragments_in_place<32 * WARPS>(reinterpret_cast<float*>(b_s), count, kb_end - kb_first);
  }
  __syncthreads();
  const LaneCopy<uint2> codebook(cb_s, copies_log2);  // (hi, lo), or (SCALED) float pairs
  const LaneCopy<uint32_t> codebook4(reinterpret_cast<uint32_t*>(smem_raw), copies_log2 + 1);
  const uint2* frag = p.fragments + rows.sibling * p.fragments_stride + lane;
  const uint2* b_lane = b_s + (g < 2 ? 4 * g + t : 0);  // FUSED: lanes 0-7 read B
  let_next_kernel_launch();

  // The rows' loop, compiled for both codebooks. EXACT: A rows g and g + 8 of an mma are the
  // lane's rows of groups i and i + 1 (even i), a lookup of 4 bytes fills one register, and a
  // k-block takes half the mmas and half the lookup bytes; else rows g and g + 8 are the high
  // and low parts of group i's row.
  const auto decode_rows = [&](auto exact_c) {
    constexpr bool EXACT = decltype(exact_c)::value != 0;
    constexpr int kMmas = EXACT ? kMmaGroups / 2 : kMmaGroups;  // a step's mmas a B tile
    for (int64_t row0 = rows.first; row0 < rows.end; row0 += rows.stride) {
      float acc[kMmaGroups][NT] = {};  // row g of group i, batch row 4 nt + t
      for (int kb = kb_first + kb_warp; kb < kb_end; kb += kTileWarps) {
        uint32_t w[kMmaGroups][BITS];
        float scale[kMmaGroups];
        // The segment of the lane's run (the k-block's, unless SCALED); past n, the row's last
        // (B is zero there).
        const int segment = std::min((kb * kBlockPairs + kRunCodes * t) >> p.seg_log2,
                                     static_cast<int>(p.scales_per_row) - 1);
#pragma unroll
        for (int i = 0; i < kMmaGroups; ++i) {
          const int64_t row = lane_row(row0, i);
          load_run<BITS>(row_words(row), words_per_row, kb, t, w[i]);
          scale[i] = __ldg(p.row_scale + row * p.scales_per_row + segment);
        }
        // The warp's next k-block of these rows, or its first of the next ones.
        const bool last = kb + kTileWarps >= kb_end;
#pragma unroll
        for (int i = 0; i < kMmaGroups; ++i)
          prefetch_run<BITS>(row_words(lane_row(last ? row0 + rows.stride : row0, i)),
                             words_per_row, last ? kb_first + kb_warp : kb + kTileWarps, t);
        float part[kMmas][NT][4] = {};
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
          uint32_t b[NT][2];
          if constexpr (FUSED) {
            const uint2 v =
                g < 2 ? b_lane[8 * ((kb - kb_first) * kSteps + s)] : make_uint2(0u, 0u);
            b[0][0] = v.x;
            b[0][1] = v.y;
          } else {
            load_b_step<NT>(frag + int64_t{kb} * kSteps * NT * 32, s, b);
          }
#pragma unroll
          for (int i = 0; i < kMmas; ++i) {
            uint32_t a[4];
            if constexpr (EXACT) {
              a[0] = codebook4[chunk_code<BITS>(w[2 * i], 2 * s)];
              a[1] = codebook4[chunk_code<BITS>(w[2 * i + 1], 2 * s)];
              a[2] = codebook4[chunk_code<BITS>(w[2 * i], 2 * s + 1)];
              a[3] = codebook4[chunk_code<BITS>(w[2 * i + 1], 2 * s + 1)];
            } else {
              // A rows g and g + 8 are the high and low parts of the lane's row: each lookup
              // fills two registers of the fragment as they are.
              high_low_fragment<SCALED>(codebook[chunk_code<BITS>(w[i], 2 * s)],
                                        codebook[chunk_code<BITS>(w[i], 2 * s + 1)], scale[i],
                                        a);
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mma_bf16_16816(part[i][nt], a, b[nt]);
          }
        }
        if constexpr (SCALED) {
#pragma unroll
          for (int i = 0; i < kMmaGroups; ++i) scale[i] = 1.0f;  // in A already
        }
        if constexpr (EXACT)
          add_scaled_pairs<NT>(acc, part, scale);
        else
          add_scaled_block<NT>(acc, part, scale);
      }
      if constexpr (CLUSTER > 1)
        store_cluster_sums<WARPS, CLUSTER>(acc, sums_s, partial_s, row0, rows.end, p.out, p.dtype);
      else
        store_row_sums<NT, WARPS>(acc, sums_s, row0, rows.end, p.m, p.batch, 1.0f, p.out,
                                  p.dtype);
    }
  };
  if (exact)
    decode_rows(IntC<!SCALED>{});
  else
    decode_rows(IntC<0>{});
}

// Pairs a row scale covers: a power of two (the wrapper checks), or the whole row.
int64_t pairs_per_scale(const QamwWeight& w) { return w.n / 2 / w.scales_per_row; }

// Whether the scales enter A (SCALED): segments of 32 or 64 pairs.
bool scaled_in_a(const QamwWeight& w) {
  return w.scales_per_row > 1 && pairs_per_scale(w) % kBlockPairs != 0;
}

// The weight's k-blocks of kBlockPairs pairs, the last one padded with zeros.
int kblocks_of(const QamwWeight& w) {
  return static_cast<int>(fragment_steps<kRunCodes>(w.n) / kSteps);
}

// Values of the weight's k-blocks: what a FUSED CTA holds of the rotated activation.
int64_t kblock_values(const QamwWeight& w) { return int64_t{kblocks_of(w)} * 2 * kBlockPairs; }

// Whether a FUSED CTA holds the rotated activation of the weight's k-blocks.
bool rotation_fits(const QamwWeight& w) { return kblock_values(w) <= kFusedValues; }

// The runs of whole Hadamard blocks a cluster splits a FUSED GEMV's k-blocks in: each
// granule_kblocks k-blocks (the least multiple of a k-block that holds whole blocks), granules
// of them up to the last k-block.
void split_runs(const QamwWeight& w, const RotationArgs& rot, MmaParams& p) {
  const int64_t kblock = 2 * kBlockPairs, block = int64_t{rot.order} * rot.pow2;
  p.granule_kblocks = static_cast<int>(std::lcm(kblock, block) / kblock);
  p.granules = static_cast<int>(ceil_div(kblocks_of(w), p.granule_kblocks));
}

// The most CTAs a cluster of the FUSED GEMV may take: 4, or 2 where the weight has 2 or 3 runs
// (split_runs), on sm_90 and later; else 1. Each CTA rotates only its runs of the activation
// (the rotation is block-diagonal), so a layer's CTAs rotate it once per 32 * cluster rows, not
// once per 32. QAMW_GEMV_CLUSTER=0 takes 1, for side-by-side benchmarks; read at each launch, as
// QAMW_GEMV_MMA is.
template <typename K>
int fused_cluster(const MmaParams& p, K kernel) {
  if (env_is("QAMW_GEMV_CLUSTER", "0") || !runs_as_sm(kernel, 90)) return 1;
  return p.granules >= 4 ? 4 : p.granules >= 2 ? 2 : 1;
}

// Launches the kernel for `batch` rows with B from `fragments` (of `rotations` activations), or
// (FUSED, batch 1) rotated by each CTA, or each CTA of a cluster its share; false when FUSED
// finds no room for the rotated activation beside one codebook copy.
bool launch_mma(const QamwWeight& w, int rotations, int64_t batch, const uint2* fragments,
                const RotationArgs* fused, void* out, DType dtype, cudaStream_t stream) {
  const int tiles = fragment_tiles(batch);
  MmaParams p{};
  p.packed = w.packed;
  p.words_per_row = w.words_per_row;
  p.codebook = w.codebook;
  p.row_scale = w.row_scale;
  p.scales_per_row = w.scales_per_row;
  p.seg_log2 = w.scales_per_row == 1 ? 30 : log2_of(w.n / 2 / w.scales_per_row);
  p.m = w.m;
  p.kblocks = kblocks_of(w);
  p.granules = 1;
  p.granule_kblocks = p.kblocks;
  p.fragments = fragments;
  p.fragments_stride = rotations > 1 ? fragment_entries<kRunCodes>(w.n, batch) : 0;
  if (fused) {
    p.rot = *fused;
    split_runs(w, *fused, p);
  }
  p.batch = static_cast<int>(batch);
  p.out = out;
  p.dtype = dtype;
  if (fused && !rotation_fits(w)) return false;
  const int warps = mma_warps(tiles, w.m, w.bits);
  // The dynamic shared memory for clusters of `cluster` CTAs and the codebook copies it holds;
  // no bytes where FUSED finds no room. Beside the copies: the warps' sums, and (FUSED) the
  // cluster's partial sums and the CTA's k-blocks of the activation, as floats and then as B
  // entries, 4 bytes a value.
  struct Plan {
    size_t smem;
    int copies_log2;
  };
  const auto plan = [&](int cluster) -> Plan {
    const int64_t values = ceil_div(p.granules, cluster) * p.granule_kblocks * 2 * kBlockPairs;
    const int64_t partial = cluster > 1 ? 4 * kMmaRowsPerCta * cluster : 0;
    const int64_t beside = mma_sums_bytes(warps, tiles) +
                           (fused ? partial + 4 * std::min(values, kblock_values(w)) : 0);
    // The copies take what the rest leaves of half an SM's shared memory where two CTAs share
    // an SM and one copy fits so, else of a whole SM's.
    int copies = mma_ctas_per_sm(warps, tiles) == 2
                     ? codebook_copies(w.bits, sizeof(uint2), shared_per_block_two_an_sm() - beside)
                     : 0;
    if (copies == 0)
      copies = codebook_copies(w.bits, sizeof(uint2), shared_per_block_optin() - beside);
    if (copies == 0) {
      if (fused) return {0, 0};
      copies = 1;  // 12 bits: 32 KiB, beside sums of at most 16 KiB
    }
    return {(sizeof(uint2) * copies << w.bits) + beside, log2_of(copies)};
  };
  const Plan alone = plan(1);
  if (alone.smem == 0) return false;
  const int most = fused ? fused_cluster(p, qamw_gemv_mma_kernel<8, 1, 8, false, true, 1>) : 1;
  const bool scaled = scaled_in_a(w);
  dispatch_qamw_bits(w.bits, [&](auto bits) {
    dispatch_tiles(tiles, [&](auto nt) {
      constexpr int kBits = decltype(bits)::value, kNt = decltype(nt)::value;
      dispatch_warps<kNt>(warps, [&](auto wp) {
        constexpr int kWarps = decltype(wp)::value;
        constexpr int kThreads = 32 * kWarps;
        const auto launch = [&](void (*kernel)(MmaParams), const Plan& at, int cluster) {
          p.copies_log2 = at.copies_log2;
          launch_gemv(kernel, kThreads, at.smem, w.siblings, w.m, kMmaRowsPerCta * cluster,
                      stream, p, cluster);
        };
        if constexpr (kNt == 1) {
          if (fused) {
            const auto kernel = [&](auto cluster) {
              constexpr int kC = decltype(cluster)::value;
              return scaled ? qamw_gemv_mma_kernel<kBits, 1, kWarps, true, true, kC>
                            : qamw_gemv_mma_kernel<kBits, 1, kWarps, false, true, kC>;
            };
            if (most > 1) {
              // Clusters of 4 CTAs, or of 2, where the device holds them at all and they take no
              // more waves of the persistent grid than CTAs alone: the SMs of a GPC that no whole
              // cluster fills stay idle, which at one CTA an SM (a 4096-row layer) could add a
              // wave.
              allow_smem(kernel(IntC<1>{}), alone.smem);
              const int64_t alone_waves = gemv_waves(
                  w.siblings, w.m, kMmaRowsPerCta,
                  resident_clusters(kernel(IntC<1>{}), kThreads, alone.smem, 1));
              const auto pays = [&](auto clustered, int cluster, const Plan& at) {
                if (at.smem == 0 || !allow_smem(clustered, at.smem)) return false;
                const int64_t resident = resident_clusters(clustered, kThreads, at.smem, cluster);
                return resident > 0 && gemv_waves(w.siblings, w.m, kMmaRowsPerCta * cluster,
                                                  resident) <= alone_waves;
              };
              const Plan four = plan(4), two = plan(2);
              if (most >= 4 && pays(kernel(IntC<4>{}), 4, four))
                return launch(kernel(IntC<4>{}), four, 4);
              if (pays(kernel(IntC<2>{}), 2, two)) return launch(kernel(IntC<2>{}), two, 2);
            }
            return launch(kernel(IntC<1>{}), alone, 1);
          }
        }
        launch(scaled ? qamw_gemv_mma_kernel<kBits, kNt, kWarps, true, false, 1>
                      : qamw_gemv_mma_kernel<kBits, kNt, kWarps, false, false, 1>, alone, 1);
      });
    });
  });
  return true;
}

}  // namespace

void qamw_gemv_mma(const QamwWeight& w, int rotations, int64_t batch, const uint2* fragments,
                   void* out, DType dtype, cudaStream_t stream) {
  launch_mma(w, rotations, batch, fragments, nullptr, out, dtype, stream);
}

bool qamw_gemv_mma_fused(const QamwWeight& w, const RotationArgs& rot, void* out, DType dtype,
                         cudaStream_t stream) {
  return launch_mma(w, 1, 1, nullptr, &rot, out, dtype, stream);
}

bool qamw_use_mma(const QamwWeight& w, int64_t batch) {
  const bool whole = w.scales_per_row == 1 || pairs_per_scale(w) % kBlockPairs == 0;
  if (!whole && pairs_per_scale(w) < kRunCodes) return false;
  // SCALED costs ~8 instructions a code more (the multiply and split), still below the
  // CUDA-core kernel for batches 2-4, which ran at 0.2x cuBLAS on an H100 (NOTES v8).
  // Batch 1 takes tensor cores at 8 bits where each CTA rotates the activation itself (one
  // launch): 1.05-1.27x the CUDA-core kernel on an H100 at the four Llama shapes (NOTES, GPU
  // v12). At 7 bits (runs of odd word counts: 4-byte loads) and 11 (conflicting lookups) it
  // was slower; the widths not measured keep the CUDA-core kernel.
  const int from = w.bits == 8 && rotation_fits(w) ? 1 : 2;
  // 16-byte loads of the codes, with no other path in the kernel's loop (rows are whole 16-byte
  // vectors, so a row slice of an aligned weight stays aligned).
  return aligned16(w.packed) && mma_wanted(batch, from) &&
         mma_allowed(qamw_gemv_mma_kernel<8, 1, 8, false, false, 1>);
}

}  // namespace qamw::cuda
