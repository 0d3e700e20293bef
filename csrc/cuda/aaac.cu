// AAAC GEMV and dequantize on the GPU: 4-bit codes into one of two 16-entry codebooks per
// group, chosen by the sign bit of the group's scale (fp16, or fp8 e4m3 with a tensor scale).
//
// GEMV: a thread owns one 16-byte vector of a row at a time (32 codes, consecutive lanes on
// consecutive vectors: coalesced), at batch 1 the same vector of two rows (rows_per_lane), and
// keeps the next one in flight; a power-of-two group of lanes shares the row(s) and reduces
// with shuffles; CTAs are persistent and stride over rows. A byte of two codes is looked up at
// once in a pair table in shared memory: entry (c, v) = (codebook c [v & 15], codebook c
// [v >> 4]) as a float2, one load and two FMAs for two weights. The table has up to 16 copies,
// entry e of copy k at e * copies + k, and lane l reads copy l % copies: 16 give every lane of
// a half-warp (one wavefront of 8-byte loads) its own banks. The activation, divided by the
// channel scale, is staged in shared memory as fp32 with 4 padding floats per 32 values (lanes
// read 16-byte vectors 36 floats apart: no conflicts); when it does not fit, it is read from
// global.
// From batch 2 a tensor-core kernel takes over (aaac_gemv_mma_kernel, below); from batch 4 for
// groups under 128 values, whose scales enter its A operand.
#include <algorithm>

#include "mma.cuh"

namespace qamw::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 32;          // codes in one 16-byte vector
constexpr int kChunkStride = 36;    // floats per chunk of the staged activation
constexpr int kPairEntries = 512;   // two codebooks x 256 bytes

// |s| of an e4m3fn byte without its sign bit: bias 7, subnormals, 0x7F is NaN (no infinities).
__device__ __forceinline__ float e4m3_magnitude(uint32_t m) {
  if (m == 0x7Fu) return __int_as_float(0x7fc00000);
  const uint32_t e = m >> 3, mant = m & 7u;
  if (e == 0) return static_cast<float>(mant) * 0.001953125f;  // mant * 2^-9
  return __int_as_float(static_cast<int>(((e + 120u) << 23) | (mant << 20)));
}

// (codebook choice, magnitude) of scale g of row `row`.
__device__ __forceinline__ void decode_scale(const void* scales, ScaleType type, int64_t index,
                                             int& choice, float& magnitude) {
  if (type == ScaleType::F16) {
    const uint32_t raw = static_cast<const uint16_t*>(scales)[index];
    choice = static_cast<int>(raw >> 15);
    magnitude = __half2float(__ushort_as_half(static_cast<unsigned short>(raw & 0x7FFFu)));
  } else {
    const uint32_t raw = static_cast<const uint8_t*>(scales)[index];
    choice = static_cast<int>(raw >> 7);
    magnitude = e4m3_magnitude(raw & 0x7Fu);
  }
}

// Pair-table entry e: the weights of byte e & 255 of two codes (low nibble first) in codebook
// e >> 8 of `codebooks` (two of 16).
__device__ __forceinline__ float2 pair_entry(const float* codebooks, int e) {
  const float* book = codebooks + 16 * (e >> 8);
  return make_float2(__ldg(book + (e & 15)), __ldg(book + ((e >> 4) & 15)));
}

// The pair table's entry of byte k (0-3) of `word` in the codebook whose first entry is `book`
// (0 or 256): the byte and the codebook's bit placed by one byte permute, where a shift, a
// mask and an or take three.
__device__ __forceinline__ uint32_t book_entry(uint32_t word, int k, uint32_t book) {
  return __byte_perm(word, book, 0x7650u | k);
}

// Where the 16-byte vector `vector` of `row` of packed codes is, both clamped into the weight
// of m rows: the rows and vectors past it that a lane reads are decoded and never stored, and
// clamped they need no branch.
__device__ __forceinline__ const uint4* code_vector(const AaacWeight& w, int64_t m, int64_t row,
                                                    int vector) {
  const int vectors_per_row = static_cast<int>(w.words_per_row / 4);
  return reinterpret_cast<const uint4*>(w.packed + std::min(row, m - 1) * w.words_per_row) +
         std::min(vector, vectors_per_row - 1);
}

// That vector: one load when the rows are 16-byte aligned (packed_vec), else four.
__device__ __forceinline__ uint4 load_code_vector(const AaacWeight& w, int64_t m,
                                                  bool packed_vec, int64_t row, int vector) {
  const uint4* src = code_vector(w, m, row, vector);
  if (packed_vec) return __ldg(src);
  const uint32_t* r32 = reinterpret_cast<const uint32_t*>(src);
  return make_uint4(__ldg(r32), __ldg(r32 + 1), __ldg(r32 + 2), __ldg(r32 + 3));
}

// Index in shared memory of activation value j: 4 padding floats after every 32 values.
struct ChunkIndex {
  __device__ int operator()(int j) const { return (j / kChunk) * kChunkStride + j % kChunk; }
};

struct GemvParams {
  AaacWeight w;
  int chunks_per_row, group_lanes, batch;
  const void* x;
  DType dtype;
  void* out;
  bool packed_vec;  // packed rows are 16-byte aligned
  bool x_vec;       // stage_activation may use vector loads
  int copies_log2;  // log2 of the pair table's copies in shared memory
  CtaSplit split;   // the CTAs of each sibling (one for a plain weight)
};

// XS: the activation is staged in shared memory (else read from global, divided on the fly).
// (kThreads, 1): without a minimum, ptxas was seen to cap some variants at 64 registers and spill.
template <int NB, bool XS>
__global__ void __launch_bounds__(kThreads, 1) aaac_gemv_kernel(GemvParams p) {
  constexpr int R = rows_per_lane(NB);  // at batch 1 an activation vector serves 8 weights
  extern __shared__ __align__(16) float smem[];
  const int copies_log2 = p.copies_log2;
  float2* pairs_s = reinterpret_cast<float2*>(smem);      // [kPairEntries][copies]
  float* x_s = smem + (2 * kPairEntries << copies_log2);  // [batch][chunks_per_row * kChunkStride]
  const int n = static_cast<int>(p.w.n);
  const int x_row = p.chunks_per_row * kChunkStride;

  const int G = p.group_lanes;
  const LaneRows lr(G, R);
  const int sub = lr.sub, row_in_cta = lr.row_in_cta;
  const CtaRows rows = cta_rows(p.split, lr.rows_per_cta);
  // The CTA's sibling as a weight of its own: rows end at its last, its codebooks and scales.
  AaacWeight w = p.w;
  w.m = rows.end;
  w.codebooks += 32 * rows.sibling;
  if (w.tensor_scale) w.tensor_scale += rows.sibling;
  if (w.channel_scale) w.channel_scale += int64_t{rows.sibling} * n;
  // Vector c of each of the R rows from `row` (clamped into the weight: rows past the CTA's are
  // decoded and never stored); a lane keeps the next ones in flight while it decodes the
  // current ones.
  const auto load_vectors = [&](int64_t row, int c, uint4 (&q)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) q[r] = load_code_vector(w, p.w.m, p.packed_vec, row + r, c);
  };
  // The first vectors travel from DRAM while the kernel before this one finishes (into L2) and
  // the CTA stages the codebooks and the activation.
  const int64_t first_row = rows.first + row_in_cta;
#pragma unroll
  for (int r = 0; r < R; ++r) prefetch_l2(code_vector(w, p.w.m, first_row + r, sub));
  wait_for_prior_kernels();
  uint4 q[R];
  load_vectors(first_row, sub, q);

  // Each warp's lanes write consecutive copies of one entry: its loads are broadcasts.
#pragma unroll 8
  for (int i = threadIdx.x; i < (kPairEntries << copies_log2); i += kThreads) {
    pairs_s[i] = pair_entry(w.codebooks, i >> copies_log2);
  }
  if constexpr (XS) {
    with_typed_activation(p.x, p.dtype, [&](auto* x) {
      stage_activation(x, n, p.batch, w.channel_scale, nullptr, 1.0f, p.x_vec, x_s, x_row,
                       ChunkIndex{});
    });
  }
  __syncthreads();

  const int64_t groups = w.n / w.group;
  const int group_log2 = __ffs(static_cast<int>(w.group)) - 1;
  const float tensor_scale = w.tensor_scale ? *w.tensor_scale : 1.0f;
  const LaneCopy<float2> pairs(pairs_s, copies_log2);
  let_next_kernel_launch();

  for (int64_t row0 = rows.first; row0 < w.m; row0 += rows.stride) {
    const int64_t row = row0 + row_in_cta;
    float acc[R][NB];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[r][b] = 0.0f;
    if (row < w.m) {
      for (int c = sub; c < p.chunks_per_row; c += G) {
        // q holds vector c; load the lane's next ones: c + G, or the first of its next rows.
        const bool same_row = c + G < p.chunks_per_row;
        uint4 q_next[R];
        load_vectors(same_row ? row : row + rows.stride, same_row ? c + G : sub, q_next);
        // And bring the ones after those into L2, so that their loads wait for L2, not DRAM.
        const int c2 = c + 2 * G;
        const int64_t row2 = c2 < p.chunks_per_row ? row : row + rows.stride;
        const int vec2 = c2 < p.chunks_per_row ? c2 : same_row ? sub : sub + G;
#pragma unroll
        for (int r = 0; r < R; ++r) prefetch_l2(code_vector(w, p.w.m, row2 + r, vec2));
        // Two halves of 16 codes: a group has at least 16 codes, so a half has one scale.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int j0 = c * kChunk + 16 * h;
          if (j0 >= n) continue;  // n is a multiple of 16: the last vector may hold one half
          float magnitude[R];
          uint32_t book[R];  // the pair table's first entry of the row's codebook
#pragma unroll
          for (int r = 0; r < R; ++r) {
            int choice = 0;  // a row past the weight's last: its last row's scale
            decode_scale(w.scales, w.scale_type,
                         std::min(row + r, p.w.m - 1) * groups + (j0 >> group_log2), choice,
                         magnitude[r]);
            book[r] = static_cast<uint32_t>(choice) << 8;
          }
          float part[R][NB];
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int b = 0; b < NB; ++b) part[r][b] = 0.0f;
#pragma unroll
          for (int quad = 0; quad < 4; ++quad) {
            float2 wv[R][2];  // weights 4 * quad .. 4 * quad + 3 of the half, two a byte
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
              for (int t = 0; t < 2; ++t) {
                const int byte = 8 * h + 2 * quad + t;  // of the 16-byte vector
                const uint32_t word = byte < 4    ? q[r].x
                                      : byte < 8  ? q[r].y
                                      : byte < 12 ? q[r].z
                                                  : q[r].w;
                wv[r][t] = pairs[book_entry(word, byte % 4, book[r])];
              }
            }
#pragma unroll
            for (int b = 0; b < NB; ++b) {
              if (NB == 1 || b < p.batch) {
                float4 xv;
                if constexpr (XS) {
                  xv = *reinterpret_cast<const float4*>(x_s + b * x_row + c * kChunkStride +
                                                        16 * h + 4 * quad);
                } else {
                  float t[4];
#pragma unroll
                  for (int e = 0; e < 4; ++e) {
                    const int j = j0 + 4 * quad + e;
                    t[e] = load_as_float(p.x, p.dtype, int64_t{b} * n + j);
                    if (w.channel_scale) t[e] /= w.channel_scale[j];
                  }
                  xv = make_float4(t[0], t[1], t[2], t[3]);
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                  part[r][b] = fmaf(wv[r][0].x, xv.x, part[r][b]);
                  part[r][b] = fmaf(wv[r][0].y, xv.y, part[r][b]);
                  part[r][b] = fmaf(wv[r][1].x, xv.z, part[r][b]);
                  part[r][b] = fmaf(wv[r][1].y, xv.w, part[r][b]);
                }
              }
            }
          }
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int b = 0; b < NB; ++b) acc[r][b] = fmaf(magnitude[r], part[r][b], acc[r][b]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) q[r] = q_next[r];
      }
    }
    // Every lane gets here: the loop over row0 is uniform across the CTA.
    reduce_and_store(acc, G, sub, row, w.m, p.w.m, p.batch, tensor_scale, p.out, p.dtype);
  }
}

// One thread per packed word (8 codes) of real data: 8 outputs, stored as 16-byte vectors.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    aaac_dequantize_kernel(AaacWeight w, T* __restrict__ out, bool vec) {
  const int64_t words = w.n / 8, total = w.m * words, groups = w.n / w.group;
  const float tensor_scale = w.tensor_scale ? *w.tensor_scale : 1.0f;
  for (int64_t e = blockIdx.x * int64_t{kThreads} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * kThreads) {
    const int64_t row = e / words, wi = e - row * words, j0 = 8 * wi;
    const uint32_t word = static_cast<uint32_t>(w.packed[row * w.words_per_row + wi]);
    int choice;
    float magnitude;
    decode_scale(w.scales, w.scale_type, row * groups + j0 / w.group, choice, magnitude);
    const float* cb = w.codebooks + 16 * choice;
    const float s = magnitude * tensor_scale;
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      v[k] = cb[(word >> (4 * k)) & 15u] * s;
      if (w.channel_scale) v[k] /= w.channel_scale[j0 + k];
    }
    store_floats<T, 8>(out + row * w.n + j0, v, vec);
  }
}

// Tensor cores (batches 2 to 16, mma.cuh). A byte of two codes is one register of an A
// fragment: the pair table holds the (hi, lo) bf16x2 parts of each (codebook, byte) entry, and
// A rows g and g + 8 are the high and low parts of one weight row, as in qamw_mma.cu; codebooks
// of bf16 values (new layers') need no low parts, and rows g and g + 8 are then two weight rows
// (EXACT, as there: half the lookup bytes and half the mmas). A k-block
// is 128 values (RUN = 16 pairs a lane: one 16-byte vector). Groups of 128 and 256 (the INT4
// setting) hold whole k-blocks, so a k-block's scale applies after its 8 steps. Smaller groups
// (NVFP4's 16) change inside a step's k, which the mma sums over, so their scale enters A
// instead (SCALED): the table holds the pairs as floats, and a lane multiplies its two weights
// by its group's magnitude before splitting them (a lane's run of 32 values spans one or two
// groups, so the magnitude changes at most once, at step 4). The work is split as in mma.cuh.
//
// A bf16 activation is its own high part and its low part is zero, so with no channel scale to
// divide by (DIRECT) the lanes read their B registers from x itself: a lane's k-pairs of one
// step are 4 consecutive values, one 8-byte load, and the lanes of low-part columns hold zeros.
// That spares the formatting launch. Other activations are formatted first (format_fragments).
constexpr int kMmaRun = 16, kMmaSteps = kMmaRun / 2, kMmaBlockValues = 8 * kMmaRun;

struct MmaParams {
  AaacWeight w;
  int kblocks, batch;
  const uint2* fragments;
  int64_t fragments_stride;  // entries from one sibling's fragments to the next's (0: shared)
  const uint2* x;            // DIRECT: the bf16 activation, 4 values an entry
  void* out;
  DType dtype;
  int copies_log2;
  CtaSplit split;
};

// B registers of step s of k-block kb read from a bf16 activation (DIRECT): lane (g, t) holds
// column 8 nt + g of tile nt, batch row 4 nt + g / 2, whose high part (g even) is the values
// kb * 128 + 2 * RUN * t + 4 s ... + 3 themselves and whose low part (g odd) is zero.
// x_lane: the lane's entry of k-block 0 of batch row g / 2.
template <int NT>
__device__ __forceinline__ void load_b_direct(const uint2* x_lane, int64_t row_entries, int batch,
                                              int kb, int s, uint32_t (&b)[NT][2]) {
  const int g = threadIdx.x % 32 / 4;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const bool high = g % 2 == 0 && 4 * nt + g / 2 < batch;
    const uint2 v = high ? __ldg(x_lane + 4 * nt * row_entries + kb * (kMmaBlockValues / 4) + s)
                         : make_uint2(0u, 0u);
    b[nt][0] = v.x;
    b[nt][1] = v.y;
  }
}

template <int NT, int WARPS, bool DIRECT, bool SCALED>
__global__ void __launch_bounds__(32 * WARPS, mma_ctas_per_sm(WARPS, NT))
    aaac_gemv_mma_kernel(MmaParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const CtaRows rows = cta_rows(p.split, kMmaRowsPerCta);
  AaacWeight w = p.w;  // the CTA's sibling, as in aaac_gemv_kernel
  w.m = rows.end;
  w.codebooks += 32 * rows.sibling;
  if (w.tensor_scale) w.tensor_scale += rows.sibling;
  // The lane's row of group i from row0 and its 16-byte vector of k-block kb, clamped into
  // the weight (code_vector): rows past the sibling's are decoded like the others and never
  // stored, and a vector past the row (the last k-block's lanes past n) meets zeros in B. So
  // the loop has no branch; the launcher takes only 16-byte aligned codes.
  const auto lane_row = [&](int64_t row0, int i) { return std::min(row0 + 8 * i + g, p.w.m - 1); };
  const auto lane_vector = [&](int64_t row, int kb) {
    return code_vector(w, p.w.m, row, kb * 4 + t);
  };
#pragma unroll
  for (int i = 0; i < kMmaGroups; ++i) prefetch_l2(lane_vector(lane_row(rows.first, i), warp));
  wait_for_prior_kernels();

  const int copies_log2 = p.copies_log2;
  uint2* pairs_s = reinterpret_cast<uint2*>(smem_raw);
  float* sums_s =
      reinterpret_cast<float*>(smem_raw + (sizeof(uint2) * kPairEntries << copies_log2));
  // Codebooks of bf16 values (new layers', aaac.py) have no low parts: the CTA then stages
  // 4-byte entries, twice the copies in the same bytes, and decodes EXACT (qamw_mma.cu).
  bool exact = false;
  if constexpr (!SCALED) {
    const uint32_t low_bits =
        threadIdx.x < 32 ? __float_as_uint(w.codebooks[threadIdx.x]) & 0xFFFFu : 0u;
    exact = __syncthreads_or(low_bits != 0) == 0;
  }
  // An 8-byte entry: the (high, low) parts, (SCALED) the float pair, or (exact) two adjacent
  // 4-byte copies of the bf16 pair.
#pragma unroll 4
  for (int i = threadIdx.x; i < (kPairEntries << copies_log2); i += 32 * WARPS) {
    const float2 v = pair_entry(w.codebooks, i >> copies_log2);
    const uint2 parts = split_pair(v.x, v.y);
    pairs_s[i] = SCALED  ? make_uint2(__float_as_uint(v.x), __float_as_uint(v.y))
                 : exact ? make_uint2(parts.x, parts.x)
                         : parts;
  }
  __syncthreads();
  const int64_t groups = w.n / w.group;
  const int group_log2 = __ffs(static_cast<int>(w.group)) - 1;
  const float tensor_scale = w.tensor_scale ? *w.tensor_scale : 1.0f;
  const LaneCopy<uint2> pairs(pairs_s, copies_log2);  // (hi, lo), or (SCALED) float pairs
  const LaneCopy<uint32_t> pairs4(reinterpret_cast<uint32_t*>(smem_raw), copies_log2 + 1);
  const uint2* frag = p.fragments + rows.sibling * p.fragments_stride + lane;
  const int64_t row_entries = w.n / 4;
  const uint2* x_lane = p.x + g / 2 * row_entries + 2 * kMmaRun * t / 4;
  let_next_kernel_launch();

  // The rows' loop, compiled for both kinds of codebook (EXACT: A rows g and g + 8 are the
  // lane's rows of groups 2 j and 2 j + 1, as in qamw_mma.cu).
  const auto decode_rows = [&](auto exact_c) {
    constexpr bool EXACT = decltype(exact_c)::value != 0;
    constexpr int kMmas = EXACT ? kMmaGroups / 2 : kMmaGroups;  // a step's mmas a B tile
    for (int64_t row0 = rows.first; row0 < w.m; row0 += rows.stride) {
      float acc[kMmaGroups][NT] = {};  // row g of group i, batch row 4 nt + t
      for (int kb = warp; kb < p.kblocks; kb += WARPS) {
        uint32_t q[kMmaGroups][4];
        // Magnitude and codebook (the pair table's first entry of it) of the lane's group: one a
        // k-block, or (SCALED) one for each half of the lane's run, steps 0-3 and 4-7.
        constexpr int kHalves = SCALED ? 2 : 1;
        float magnitude[kMmaGroups][kHalves];
        uint32_t book[kMmaGroups][kHalves];
#pragma unroll
        for (int i = 0; i < kMmaGroups; ++i) {
          const int64_t row = lane_row(row0, i);
          const uint4 v = __ldg(lane_vector(row, kb));
          q[i][0] = v.x;
          q[i][1] = v.y;
          q[i][2] = v.z;
          q[i][3] = v.w;
#pragma unroll
          for (int h = 0; h < kHalves; ++h) {
            if (h > 0 && group_log2 > 4) {  // groups of 32 and more: the run's one group
              magnitude[i][h] = magnitude[i][0];
              book[i][h] = book[i][0];
              continue;
            }
            // Past the row's last value (groups under 128), the row's last group: B is zero there.
            const int64_t value = std::min(
                int64_t{kb} * kMmaBlockValues + (SCALED ? kMmaRun * (2 * t + h) : 0), w.n - 1);
            int choice = 0;
            decode_scale(w.scales, w.scale_type, row * groups + (value >> group_log2), choice,
                         magnitude[i][h]);
            book[i][h] = static_cast<uint32_t>(choice) << 8;
          }
        }
        // The warp's next k-block of these rows, or its first of the next ones.
        const bool last = kb + WARPS >= p.kblocks;
#pragma unroll
        for (int i = 0; i < kMmaGroups; ++i)
          prefetch_l2(lane_vector(lane_row(last ? row0 + rows.stride : row0, i),
                                  last ? warp : kb + WARPS));
        float part[kMmas][NT][4] = {};
#pragma unroll
        for (int s = 0; s < kMmaSteps; ++s) {
          uint32_t b[NT][2];
          if constexpr (DIRECT) {
            load_b_direct<NT>(x_lane, row_entries, p.batch, kb, s, b);
          } else {
            load_b_step<NT>(frag + int64_t{kb} * kMmaSteps * NT * 32, s, b);
          }
          const int h = SCALED ? s / (kMmaSteps / 2) : 0;
          // Bytes 2 s and 2 s + 1 of a vector (pairs 2 s and 2 s + 1 of the lane's run), each
          // beside the codebook's bit in one byte permute (book_entry).
          const auto entry = [&](int i, int byte) {
            return book_entry(q[i][s / 2], 2 * (s % 2) + byte, book[i][h]);
          };
#pragma unroll
          for (int i = 0; i < kMmas; ++i) {
            uint32_t a[4];
            if constexpr (EXACT) {
              a[0] = pairs4[entry(2 * i, 0)];
              a[1] = pairs4[entry(2 * i + 1, 0)];
              a[2] = pairs4[entry(2 * i, 1)];
              a[3] = pairs4[entry(2 * i + 1, 1)];
            } else {
              high_low_fragment<SCALED>(pairs[entry(i, 0)], pairs[entry(i, 1)], magnitude[i][h],
                                        a);
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mma_bf16_16816(part[i][nt], a, b[nt]);
          }
        }
        float block_scale[kMmaGroups];  // SCALED: the magnitudes are in A already
#pragma unroll
        for (int i = 0; i < kMmaGroups; ++i) block_scale[i] = SCALED ? 1.0f : magnitude[i][0];
        if constexpr (EXACT)
          add_scaled_pairs<NT>(acc, part, block_scale);
        else
          add_scaled_block<NT>(acc, part, block_scale);
      }
      store_row_sums<NT, WARPS>(acc, sums_s, row0, w.m, p.w.m, p.batch, tensor_scale, p.out,
                                p.dtype);
    }
  };
  if (exact)
    decode_rows(IntC<!SCALED>{});
  else
    decode_rows(IntC<0>{});
}

// Whether the tensor-core GEMV serves this call (mma_wanted): groups of whole k-blocks, or
// (SCALED) of 16 values or more that divide one, on sm_80 and later. SCALED costs ~8
// instructions a weight (SASS, sm_90: the multiply and split of ~6 per weight added to ~2),
// against ~1.5 + 2 * batch for the CUDA-core kernel, so it takes over from batch 4.
bool use_mma_gemv(const AaacWeight& w, int64_t batch) {
  const bool whole = w.group % kMmaBlockValues == 0;
  // 16-byte loads of the codes, with no other path in the kernel's loop.
  return aligned16(w.packed) && mma_wanted(batch, whole ? 2 : 4) &&
         (whole || (w.group >= 16 && kMmaBlockValues % w.group == 0)) &&
         mma_allowed(aaac_gemv_mma_kernel<1, 8, false, false>);
}

// Whether the tensor-core GEMV reads its B registers from x (DIRECT): bf16, no channel scale,
// rows of whole k-blocks (no zeros to supply past n), 8-byte aligned.
bool direct_b(const AaacWeight& w, const void* x, DType dtype) {
  return dtype == DType::BF16 && w.channel_scale == nullptr && w.n % kMmaBlockValues == 0 &&
         (reinterpret_cast<uintptr_t>(x) & 7) == 0;
}

void aaac_gemv_mma(const AaacWeight& w, const void* x, DType dtype, int64_t batch, void* out,
                   uint2* fragments, cudaStream_t stream) {
  const bool direct = direct_b(w, x, dtype), scaled = w.group < kMmaBlockValues;
  const int versions = w.channel_scale ? w.siblings.count : 1;
  if (!direct)
    format_fragments<kMmaRun>(x, dtype, 0, w.channel_scale, versions, w.n, batch, fragments,
                              stream);
  MmaParams p{};
  p.w = w;
  p.kblocks = static_cast<int>(fragment_steps<kMmaRun>(w.n) / kMmaSteps);
  p.batch = static_cast<int>(batch);
  p.fragments = fragments;
  p.fragments_stride = versions > 1 ? fragment_entries<kMmaRun>(w.n, batch) : 0;
  p.x = static_cast<const uint2*>(x);
  p.out = out;
  p.dtype = dtype;
  const int tiles = fragment_tiles(batch);
  const int warps = mma_warps(tiles, w.m, 9);  // the pair table: 512 entries
  const int64_t sums_bytes = mma_sums_bytes(warps, tiles);
  // 16 copies (a half-warp's 8-byte lookups on their own banks) where the CTAs an SM allow them
  // (mma_ctas_per_sm), else fewer. 512 entries: 9 bits.
  const int64_t budget = (mma_ctas_per_sm(warps, tiles) == 2 ? shared_per_block_two_an_sm()
                                                              : int64_t{shared_per_block_optin()}) -
                         sums_bytes;
  const int copies = codebook_copies(9, sizeof(uint2), budget);
  p.copies_log2 = __builtin_ctz(copies);
  const size_t smem = static_cast<size_t>(int64_t{sizeof(uint2)} * kPairEntries * copies +
                                          sums_bytes);
  dispatch_tiles(tiles, [&](auto nt) {
    constexpr int kNt = decltype(nt)::value;
    dispatch_warps<kNt>(warps, [&](auto wp) {
      constexpr int kWarps = decltype(wp)::value;
      const auto launch = [&](auto kernel) {
        launch_gemv(kernel, 32 * kWarps, smem, w.siblings, w.m, kMmaRowsPerCta, stream, p);
      };
      if (scaled) {
        if (direct) launch(aaac_gemv_mma_kernel<kNt, kWarps, true, true>);
        else launch(aaac_gemv_mma_kernel<kNt, kWarps, false, true>);
      } else {
        if (direct) launch(aaac_gemv_mma_kernel<kNt, kWarps, true, false>);
        else launch(aaac_gemv_mma_kernel<kNt, kWarps, false, false>);
      }
    });
  });
}

}  // namespace

int64_t aaac_gemv_workspace_floats(const AaacWeight& w, int64_t batch) {
  return use_mma_gemv(w, batch) ? w.siblings.count * 2 * fragment_entries<kMmaRun>(w.n, batch)
                                : 0;
}

void aaac_gemv(const AaacWeight& w, const void* x, DType dtype, int64_t batch, void* out,
               float* workspace, void* stream) {
  if (batch == 0 || w.m == 0) return;
  if (use_mma_gemv(w, batch))
    return aaac_gemv_mma(w, x, dtype, batch, out, reinterpret_cast<uint2*>(workspace),
                         as_stream(stream));
  GemvParams p{};
  p.w = w;
  p.chunks_per_row = static_cast<int>(ceil_div(w.n, kChunk));
  p.group_lanes = gemv_group_lanes(p.chunks_per_row, batch);
  p.batch = static_cast<int>(batch);
  p.x = x;
  p.dtype = dtype;
  p.out = out;
  p.packed_vec = aligned16(w.packed);
  p.x_vec = stage_vectors(x, w.channel_scale, nullptr, w.n);
  const int64_t x_bytes = int64_t{sizeof(float)} * batch * p.chunks_per_row * kChunkStride;
  const int64_t optin = shared_per_block_optin();
  // The activation is staged whenever the device's shared memory holds it beside one copy of
  // the pair table: even at one CTA an SM, one 16-byte shared load per 4 weights beats two
  // global loads and a division per weight.
  const auto table_bytes = [](int copies) {
    return int64_t{sizeof(float2)} * kPairEntries * copies;
  };
  const bool staged = table_bytes(1) + x_bytes <= optin;
  const int64_t beside = staged ? x_bytes : 0;
  // Copies: 16, or down to 4 so that two CTAs share an SM, else as many as one CTA holds.
  const int64_t half_sm = shared_per_block_two_an_sm();
  int copies = 16;
  while (copies > 4 && table_bytes(copies) + beside > half_sm) copies /= 2;
  if (table_bytes(copies) + beside > half_sm) {
    copies = 16;
    while (copies > 1 && table_bytes(copies) + beside > optin) copies /= 2;
  }
  p.copies_log2 = __builtin_ctz(copies);
  const size_t smem = static_cast<size_t>(table_bytes(copies) + beside);
  const int64_t rows_per_cta = gemv_rows_per_cta(kThreads, p.group_lanes, rows_per_lane(batch));
  dispatch_batch(batch, [&](auto nb) {
    const auto launch = [&](auto kernel) {
      launch_gemv(kernel, kThreads, smem, w.siblings, w.m, rows_per_cta, as_stream(stream), p);
    };
    if (staged) launch(aaac_gemv_kernel<decltype(nb)::value, true>);
    else launch(aaac_gemv_kernel<decltype(nb)::value, false>);
  });
}

void aaac_dequantize(const AaacWeight& w, void* out, DType dtype, void* stream) {
  if (w.m == 0 || w.n == 0) return;
  if (w.siblings.count > 1)
    return dequantize_each_sibling(w, dtype, out, [&](const AaacWeight& v, void* rows) {
      aaac_dequantize(v, rows, dtype, stream);
    });
  const unsigned grid = capped_grid(ceil_div(w.m * (w.n / 8), kThreads));
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    aaac_dequantize_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(
        w, static_cast<T*>(out), aligned16(out));
  });
}

}  // namespace qamw::cuda
