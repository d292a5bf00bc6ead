// XNOR convolution as an implicit GEMM on 1-bit tensor cores: the kernel bodies.
//
// GEMM view (per convolution group g):
//   rows    m = (n, oh, ow) output pixels                      (M = N*OH*OW)
//   columns k = output channels of group g                     (Kg = K / G)
//   depth   q = (tap, word) = tap*Wg + word, tap = r*KW + s    (Q = KH*KW*Wg 32-bit words)
// A[m][q] is the packed input word of pixel m at tap `tap` (zero where the tap falls into the
// zero padding), B[k][q] the packed weight word -- exactly the memory order of the packed
// weights (K, KH, KW, Wg), so B rows are contiguous.  With bit 1 = +1,
//   dot = 4*popc(x & w) - 2*popc(x) - 2*popc(w) + K_valid                       (DESIGN.md)
// summed over the valid taps only.  Let wsum[k][tap] = 2*popc(w[k][tap]) - Cg (the sum of the
// +-1 weights of one tap).  Padded taps have x = 0, so their popc(x & w) and popc(x) are 0, and
//   dot = 4*acc - 2*popx(m) - sum_all_taps wsum[k][tap] + sum_{padded taps of m} wsum[k][tap]
// where acc is the tensor-core AND-popcount and popx(m) the popcount of row m of A.
// Interior pixels skip the last sum (their padded-tap mask is 0).
//
// Every function here is BNAS_HD and takes a `Ctx` that supplies thread/block indices, shared
// memory, __syncthreads, cp.async and the mma: DeviceCtx (device_ctx.cuh) on the GPU,
// EmuCtx (emulator.cpp) in the host warp emulator, which runs these same bodies for all
// threads of a block.
#pragma once

#include "common.cuh"
#include "mma_b1.cuh"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace bnas_cuda {

// ----------------------------------------------------------------------------------------
// Shapes.  Python passes the raw integers in this order (conv_plan.CONV_DIMS mirrors it).
enum ConvDim {
  kDimN, kDimH, kDimW, kDimC, kDimGroups, kDimK, kDimKH, kDimKW,
  kDimSH, kDimSW, kDimPH, kDimPW, kDimDH, kDimDW, kDimOutGroups, kDimCount
};

constexpr int kMaxTaps = 64;   // the padded-tap mask of a pixel is one 64-bit word

struct ConvShape {
  int N, H, W, C, G, Cg, Wg, GW;        // input; GW = G*Wg words per input pixel
  int K, Kg;                            // output channels
  int KH, KW, T;                        // kernel, T = KH*KW taps
  int SH, SW, PH, PW, DH, DW;
  int OH, OW, OHW, M, Q;                // M = N*OH*OW GEMM rows, Q = T*Wg GEMM depth in words
  int out_groups, out_Kg, out_Wg, out_GW;   // packed-output format (groups of the next layer)
};

struct ConvArgs {
  ConvShape s;
  const uint32_t* x;          // packed NHWC input (N, H, W, GW)
  const uint32_t* w;          // packed weights (K, KH, KW, Wg)
  const int32_t* tap_sums;    // (K, KH*KW): 2*popc(w[k][tap]) - Cg, from conv_tap_sum (computed once per weights)
  const float* scale;         // (K) or null: y = dot * scale
  const float* bias;          // (K) or null: y = ... + bias
  float* out;                 // (N, K, OH, OW) float or null
  uint32_t* out_packed;       // (N, OH, OW, out_GW) or null; zeroed first if packed_output_needs_zeroing
  // split-K (splits > 1): blockIdx.z takes a slice of the depth; partial sums meet in
  // split_acc (per output tile: BM*BN accumulators, then BM popc(x) sums) and the block that
  // finishes a tile last (split_count, one per tile) runs the epilogue.  Both zeroed first.
  int splits = 1;
  int32_t* split_acc = nullptr;
  int32_t* split_count = nullptr;
};

// Validates the integers and derives the rest; returns an error message or nullptr.
inline const char* conv_shape_from_dims(const int64_t* d, ConvShape& s) {
  for (int i = 0; i < kDimCount; ++i) {
    const bool may_be_zero = (i == kDimPH || i == kDimPW);
    if (d[i] < (may_be_zero ? 0 : 1)) return "conv dims: sizes, strides and dilations must be >= 1 and padding >= 0";
    if (d[i] > (1 << 30)) return "conv dims: a size exceeds 2^30";
  }
  s.N = (int)d[kDimN]; s.H = (int)d[kDimH]; s.W = (int)d[kDimW]; s.C = (int)d[kDimC];
  s.G = (int)d[kDimGroups]; s.K = (int)d[kDimK]; s.KH = (int)d[kDimKH]; s.KW = (int)d[kDimKW];
  s.SH = (int)d[kDimSH]; s.SW = (int)d[kDimSW]; s.PH = (int)d[kDimPH]; s.PW = (int)d[kDimPW];
  s.DH = (int)d[kDimDH]; s.DW = (int)d[kDimDW]; s.out_groups = (int)d[kDimOutGroups];
  if (s.C % s.G != 0 || s.K % s.G != 0) return "conv dims: channels and filters must be divisible by groups";
  if (s.K % s.out_groups != 0) return "conv dims: filters must be divisible by the packed-output groups";
  s.Cg = s.C / s.G; s.Wg = ceil_div(s.Cg, 32); s.GW = s.G * s.Wg; s.Kg = s.K / s.G;
  s.T = s.KH * s.KW;
  if (s.T > kMaxTaps) return "conv dims: the CUDA XNOR kernel supports at most 64 kernel taps (KH*KW <= 64)";
  if ((int64_t)(s.KH - 1) * s.DH > 32767 || (int64_t)(s.KW - 1) * s.DW > 32767)
    return "conv dims: dilated kernel extent above 32767";
  const int64_t eh = (int64_t)s.H + 2 * s.PH - (int64_t)s.DH * (s.KH - 1) - 1;
  const int64_t ew = (int64_t)s.W + 2 * s.PW - (int64_t)s.DW * (s.KW - 1) - 1;
  if (eh < 0 || ew < 0) return "conv dims: the kernel is larger than the padded input";
  s.OH = (int)(eh / s.SH + 1); s.OW = (int)(ew / s.SW + 1);
  s.Q = s.T * s.Wg;
  s.out_Kg = s.K / s.out_groups; s.out_Wg = ceil_div(s.out_Kg, 32); s.out_GW = s.out_groups * s.out_Wg;
  const int64_t lim = (int64_t)1 << 31;
  const int64_t ohw = (int64_t)s.OH * s.OW, m = (int64_t)s.N * ohw;
  if ((int64_t)s.N * s.H * s.W * s.GW >= lim || m * s.K >= lim || (int64_t)s.K * s.Q >= lim ||
      m * s.out_GW >= lim || (int64_t)s.H * s.W * s.GW >= lim)
    return "conv dims: tensor too large for 32-bit indexing; split the batch";
  s.OHW = (int)ohw; s.M = (int)m;
  return nullptr;
}

// ----------------------------------------------------------------------------------------
// Tile configuration.
//   BM x BN block tile (pixels x channels), WM x WN per warp, BKW words (BKW*32 bits) of depth
//   per pipeline stage, STAGES-deep cp.async pipeline, VW words per global->shared copy.
//   SPLIT_K: the configuration can take a slice of the depth (split-K, see conv_split_reduce).
template <int BM_, int BN_, int WM_, int WN_, int BKW_, int STAGES_, int VW_, bool SPLIT_K_ = false>
struct ConvTile {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, BKW = BKW_, STAGES = STAGES_, VW = VW_;
  static constexpr bool SPLIT_K = SPLIT_K_;
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN, WARPS = WARPS_M * WARPS_N;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int MT = WM / kMmaM, NT = WN / kMmaN, KSTEPS = BKW / kMmaKWords;
  static constexpr int CHUNKS = BKW / VW;                  // copies per tile row per stage
  static constexpr int A_ITERS = BM * CHUNKS / THREADS;    // copies per thread per stage
  static constexpr int B_ITERS = BN * CHUNKS / THREADS;
  static constexpr int QUADS = BKW / 4;                            // 16-byte (4-word) chunks per row
  static constexpr int ROWS_PER_LINE = BKW >= 32 ? 1 : 32 / BKW;   // tile rows per 128-byte bank line
  static constexpr int STAGE_WORDS = (BM + BN) * BKW;
  static constexpr int OUT_WORDS = BN / 32;                        // packed-output words per block row
  static_assert(BM % WM == 0 && BN % WN == 0 && WM % kMmaM == 0 && WN % kMmaN == 0, "warp tiling");
  static_assert(NT % 2 == 0, "B fragments are loaded two n-tiles per ldmatrix.x4");
  static_assert(BKW % 8 == 0 && (QUADS & (QUADS - 1)) == 0 && BKW <= 32, "stage depth: 8, 16 or 32 words");
  static_assert((kMmaM / ROWS_PER_LINE) % QUADS == 0, "the swizzle repeats every 16 rows");
  static_assert(VW == 1 || VW == 2 || VW == 4, "copy width");
  static_assert(THREADS % CHUNKS == 0 && (BM * CHUNKS) % THREADS == 0 && (BN * CHUNKS) % THREADS == 0, "copy split");
  static_assert(BN % 32 == 0 && WN % 32 == 0, "the epilogue packs a warp row's 32 columns (one sign word) at a time");
  static_assert(BM <= THREADS && BN <= THREADS, "one thread per row in the prologue");
  static_assert(STAGES >= 2, "pipeline");
};

// Shared-memory word offset of (row, word) in one operand tile of a stage.  16-byte chunks
// are XOR-swizzled by row, so the eight 16-byte rows that one ldmatrix phase reads (8
// consecutive rows, same logical chunk) fall into 8 distinct 16-byte bank groups.  A copy of
// VW <= 4 words never crosses a chunk.  The swizzle of row r and r + 16 is the same.
template <class Tile>
BNAS_HD int tile_word(int row, int word) {
  const int quad = (word >> 2) ^ ((row / Tile::ROWS_PER_LINE) & (Tile::QUADS - 1));
  return row * Tile::BKW + (quad << 2) + (word & 3);
}

// The ldmatrix.x4 row addresses of one lane (all in words from the operand tile's start).
// Lane l supplies row l % 8 of matrix l / 8; matrix j's register lands in lane (g, t) as word
// t of its row g (PTX ldmatrix .m8n8 .b16), which is exactly the m16n8k256 .b1 fragment:
//   A (16 rows x 8 words): matrices (rows 0-7, words 0-3), (rows 8-15, words 0-3),
//                          (rows 0-7, words 4-7), (rows 8-15, words 4-7) -> a0, a1, a2, a3;
//   B (two n-tiles of 8 rows): (tile 0, words 0-3), (tile 0, words 4-7), (tile 1, words 0-3),
//                          (tile 1, words 4-7) -> b0, b1 of tile 0, b0, b1 of tile 1.
template <class Tile>
BNAS_HD int a_ldsm_word(int lane, int first_row, int ks) {
  const int mat = lane >> 3;
  return tile_word<Tile>(first_row + (lane & 7) + 8 * (mat & 1), ks * 8 + 4 * (mat >> 1));
}
template <class Tile>
BNAS_HD int b_ldsm_word(int lane, int first_row, int ks) {
  const int mat = lane >> 3;
  return tile_word<Tile>(first_row + (lane & 7) + 8 * (mat >> 1), ks * 8 + 4 * (mat & 1));
}

// Shared memory layout (bytes), a function of the tap count only.
struct ConvSmem {
  int pipe, row_mask, wsum, col_scale, col_bias, tap_delta, row_pix, row_out, row_popx, px_part, sign_rows, flag, total;
};

template <class Tile>
BNAS_HD ConvSmem conv_smem_layout(int T) {
  ConvSmem L;
  int off = 0;
  L.pipe = off;      off += Tile::STAGES * Tile::STAGE_WORDS * 4;
  L.row_mask = off;  off += Tile::BM * 8;               // uint64 per pixel: padded taps (all ones: no pixel)
  L.wsum = off;      off += (T + 1) * Tile::BN * 4;     // wsum[tap][col], row T = sum over taps
  L.col_scale = off; off += Tile::BN * 4;               // scale of each column (1 without scale)
  L.col_bias = off;  off += Tile::BN * 4;               // bias of each column (0 without bias)
  L.tap_delta = off; off += T * 4;                      // word offset of tap t from the pixel's tap 0
  L.row_pix = off;   off += Tile::BM * 4;               // word offset of (n, ih0, iw0, group) (tap 0)
  L.row_out = off;   off += Tile::BM * 4;               // n*K*OHW + oh*OW + ow, -1 = no pixel
  L.row_popx = off;  off += Tile::BM * 4;               // popc(x) of each row over the whole depth
  L.px_part = off;   off += Tile::BM * 4 * 4;           // popc(x) partial sums, 4 lanes per row
  L.sign_rows = off; off += Tile::BM * Tile::OUT_WORDS * 4;   // packed output: sign bits [row][BN/32]
  L.flag = off;      off += 16;                         // split-K: whether this block finishes its tile
  L.total = off;
  return L;
}

// Mask of the real channel bits in the last word of a group (Cg % 32 != 0), else all ones.
BNAS_HD uint32_t tail_word_mask(int Cg) { return (Cg & 31) ? (1u << (Cg & 31)) - 1u : 0xffffffffu; }

// ----------------------------------------------------------------------------------------
// Per-thread registers of the conv kernel.
template <class Tile>
struct ConvRegs {
  int32_t acc[Tile::MT][Tile::NT][4];
  int32_t px[Tile::MT][2];        // popc of this lane's A words, rows g and g+8
  int a_tap, a_word;              // depth position of this thread's A copies (advances by BKW)
  int a_dt, a_dw;                 // BKW = a_dt * Wg + a_dw
  uint64_t a_tap_bit;             // 1 << a_tap (0 past tap 63), the padded-tap mask bit of a_tap
};

struct BlockPos {
  int m0, g, n0, ncols;           // first pixel, group, first channel in the group, channels here
};

template <class Tile, class Ctx>
BNAS_HD BlockPos conv_block_pos(const ConvShape& s, Ctx& ctx) {
  BlockPos b;
  const int nblk = ceil_div(s.Kg, Tile::BN);
  b.m0 = ctx.block_x() * Tile::BM;
  b.g = ctx.block_y() / nblk;
  b.n0 = (ctx.block_y() % nblk) * Tile::BN;
  b.ncols = imin(Tile::BN, s.Kg - b.n0);
  return b;
}

// Prologue, one thread per pixel row / kernel tap: address bases and padded-tap masks.
template <class Tile, class Ctx>
BNAS_HD void conv_prologue_rows(const ConvShape& s, const BlockPos& b, const ConvSmem& L, Ctx& ctx) {
  uint8_t* sm = ctx.smem();
  int* tap_delta = reinterpret_cast<int*>(sm + L.tap_delta);
  const int tid = ctx.tid();
  for (int t = tid; t < s.T; t += Tile::THREADS)
    tap_delta[t] = ((t / s.KW) * s.DH * s.W + (t % s.KW) * s.DW) * s.GW;
  // the epilogue ORs sign bits into these words (each thread owns 8 bits of a word)
  uint32_t* sign_rows = reinterpret_cast<uint32_t*>(sm + L.sign_rows);
  for (int i = tid; i < Tile::BM * Tile::OUT_WORDS; i += Tile::THREADS) sign_rows[i] = 0;
  if (tid < Tile::BM) {
    int* row_pix = reinterpret_cast<int*>(sm + L.row_pix);
    int* row_out = reinterpret_cast<int*>(sm + L.row_out);
    uint64_t* row_mask = reinterpret_cast<uint64_t*>(sm + L.row_mask);
    const int m = b.m0 + tid;
    if (m < s.M) {
      const int n = m / s.OHW, ohw = m % s.OHW;
      const int ih0 = (ohw / s.OW) * s.SH - s.PH, iw0 = (ohw % s.OW) * s.SW - s.PW;
      uint64_t mask = 0;
      for (int t = 0; t < s.T; ++t) {
        const int ih = ih0 + (t / s.KW) * s.DH, iw = iw0 + (t % s.KW) * s.DW;
        if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) mask |= (uint64_t)1 << t;
      }
      // may point before the tensor for a padded tap 0; only valid taps are ever read
      row_pix[tid] = n * s.H * s.W * s.GW + (ih0 * s.W + iw0) * s.GW + b.g * s.Wg;
      row_out[tid] = n * s.K * s.OHW + ohw;
      row_mask[tid] = mask;
    } else {
      row_pix[tid] = 0;
      row_out[tid] = -1;
      row_mask[tid] = ~(uint64_t)0;
    }
  }
}

// Prologue: the block's columns of the precomputed tap sums (contiguous per channel).  Runs
// while the first pipeline stages are in flight.
template <class Tile, class Ctx>
BNAS_HD void conv_prologue_weights(const ConvArgs& a, const BlockPos& b, const ConvSmem& L, Ctx& ctx) {
  const ConvShape& s = a.s;
  int* wsum = reinterpret_cast<int*>(ctx.smem() + L.wsum);
  const int32_t* src = a.tap_sums + (int64_t)(b.g * s.Kg + b.n0) * s.T;
  for (int i = ctx.tid(); i < Tile::BN * s.T; i += Tile::THREADS) {
    const int col = i / s.T, tap = i % s.T;
    wsum[tap * Tile::BN + col] = col < b.ncols ? ctx.ld(src + i) : 0;
  }
  float* col_scale = reinterpret_cast<float*>(ctx.smem() + L.col_scale);
  float* col_bias = reinterpret_cast<float*>(ctx.smem() + L.col_bias);
  const int k0 = b.g * s.Kg + b.n0;
  for (int col = ctx.tid(); col < Tile::BN; col += Tile::THREADS) {
    const bool ok = col < b.ncols;
    col_scale[col] = a.scale && ok ? ctx.ld(a.scale + k0 + col) : 1.0f;
    col_bias[col] = a.bias && ok ? ctx.ld(a.bias + k0 + col) : 0.0f;
  }
}

template <class Tile, class Ctx>
BNAS_HD void conv_prologue_weight_totals(const ConvShape& s, const ConvSmem& L, Ctx& ctx) {
  int* wsum = reinterpret_cast<int*>(ctx.smem() + L.wsum);
  const int col = ctx.tid();
  if (col < Tile::BN) {
    int tot = 0;
    for (int t = 0; t < s.T; ++t) tot += wsum[t * Tile::BN + col];
    wsum[s.T * Tile::BN + col] = tot;
  }
}

// Issue the cp.async copies of depth block `kt` into pipeline buffer `stage`.
template <class Tile, class Ctx>
BNAS_HD void conv_load_stage(const ConvArgs& a, const BlockPos& b, const ConvSmem& L,
                             ConvRegs<Tile>& R, int stage, int kt, Ctx& ctx) {
  const ConvShape& s = a.s;
  uint8_t* sm = ctx.smem();
  uint32_t* As = reinterpret_cast<uint32_t*>(sm + L.pipe) + stage * Tile::STAGE_WORDS;
  uint32_t* Bs = As + Tile::BM * Tile::BKW;
  const int* tap_delta = reinterpret_cast<const int*>(sm + L.tap_delta);
  const int* row_pix = reinterpret_cast<const int*>(sm + L.row_pix);
  const uint64_t* row_mask = reinterpret_cast<const uint64_t*>(sm + L.row_mask);
  const int tid = ctx.tid();
  const int c = (tid % Tile::CHUNKS) * Tile::VW;        // word within the stage, fixed per thread
  const int row0 = tid / Tile::CHUNKS;
  constexpr int ROW_STEP = Tile::THREADS / Tile::CHUNKS;

  // A: input words of tap R.a_tap, word R.a_word (the same for all rows of this thread).
  // 32-bit word offsets (the shape check keeps every tensor below 2^31 words) and a select
  // on the offset, not the pointer, keep the address math short.
  const bool tap_ok = R.a_tap < s.T;
  const int tap = tap_ok ? R.a_tap : 0;
  const int delta = tap_delta[tap] + R.a_word;
BNAS_UNROLL
  for (int i = 0; i < Tile::A_ITERS; ++i) {
    const int row = row0 + i * ROW_STEP;
    const bool ok = tap_ok & ((row_mask[row] & R.a_tap_bit) == 0);
    const uint32_t off = (uint32_t)(row_pix[row] + delta) & (0u - (uint32_t)ok);   // 0 when skipped
    ctx.template cp_async<Tile::VW * 4>(As + tile_word<Tile>(row, c), a.x + off, ok);
  }
  // B: weight words, contiguous along the depth
  const int q = kt * Tile::BKW + c;
  const int wrow0 = (b.g * s.Kg + b.n0) * s.Q + q;
BNAS_UNROLL
  for (int i = 0; i < Tile::B_ITERS; ++i) {
    const int col = row0 + i * ROW_STEP;
    const bool ok = (col < b.ncols) & (q < s.Q);
    const uint32_t off = (uint32_t)(wrow0 + col * s.Q) & (0u - (uint32_t)ok);
    ctx.template cp_async<Tile::VW * 4>(Bs + tile_word<Tile>(col, c), a.w + off, ok);
  }
  // advance this thread's depth position by BKW = a_dt*Wg + a_dw words
  // (branch-free wrap of the word into the next tap: borrow = -1 when it does not wrap)
  R.a_word += R.a_dw - s.Wg;
  const int borrow = R.a_word >> 31;
  R.a_word += borrow & s.Wg;
  const int taps = R.a_dt + 1 + borrow;
  R.a_tap += taps;
  R.a_tap_bit <<= taps;   // <= 33 places (BKW <= 32 words): a defined shift
}

// Fragments of the 256-bit depth steps of one stage (ldmatrix, see a_ldsm_word), then the
// mma.  `nks` = depth steps holding data: the last stage of a depth that is not a multiple
// of BKW words skips the steps that would multiply zeros.
template <class Tile, class Ctx>
BNAS_HD void conv_compute_stage(const ConvSmem& L, ConvRegs<Tile>& R, int stage, int nks, Ctx& ctx) {
  const uint32_t* As = reinterpret_cast<const uint32_t*>(ctx.smem() + L.pipe) + stage * Tile::STAGE_WORDS;
  const uint32_t* Bs = As + Tile::BM * Tile::BKW;
  const int warp = ctx.tid() / 32, lane = ctx.tid() % 32;
  const int wm = warp % Tile::WARPS_M, wn = warp / Tile::WARPS_M;
BNAS_UNROLL
  for (int ks = 0; ks < Tile::KSTEPS; ++ks) {
    if (ks > 0 && ks >= nks) break;   // uniform over the block
    uint32_t af[Tile::MT][4], bf[Tile::NT / 2][4];
    const uint32_t* a_lane = As + a_ldsm_word<Tile>(lane, wm * Tile::WM, ks);
    const uint32_t* b_lane = Bs + b_ldsm_word<Tile>(lane, wn * Tile::WN, ks);
BNAS_UNROLL
    for (int mt = 0; mt < Tile::MT; ++mt) ctx.ldsm_x4(af[mt], a_lane + mt * kMmaM * Tile::BKW);
BNAS_UNROLL
    for (int p = 0; p < Tile::NT / 2; ++p) ctx.ldsm_x4(bf[p], b_lane + p * 2 * kMmaN * Tile::BKW);
    if (wn == 0) {   // popc(x) once per row: only the warps of the first column count it
BNAS_UNROLL
      for (int mt = 0; mt < Tile::MT; ++mt) {
        R.px[mt][0] += popc32(af[mt][0]) + popc32(af[mt][2]);
        R.px[mt][1] += popc32(af[mt][1]) + popc32(af[mt][3]);
      }
    }
BNAS_UNROLL
    for (int mt = 0; mt < Tile::MT; ++mt)
BNAS_UNROLL
      for (int nt = 0; nt < Tile::NT; ++nt) ctx.mma(R.acc[mt][nt], af[mt], &bf[nt >> 1][2 * (nt & 1)]);
  }
}

// Output word (within a pixel) and bit of global channel k in the packed-output format.
BNAS_HD int out_word_of(const ConvShape& s, int k) { return (k / s.out_Kg) * s.out_Wg + (k % s.out_Kg) / 32; }

// Bits [c, c + n) (n <= 32) of a row of block-column sign bits.
BNAS_HD uint32_t row_bits(const uint32_t* words, int nwords, int c, int n) {
  const int w = c >> 5, sh = c & 31;
  uint32_t v = words[w] >> sh;
  if (sh && w + 1 < nwords) v |= words[w + 1] << (32 - sh);
  return n >= 32 ? v : v & ((1u << n) - 1u);
}

// Epilogue.  With bit 1 = +1 and the identity at the top of this file, element (row, col) is
//   dot = 4*acc - 2*popx(row) - wsum_total(col) + sum over padded taps of row of wsum(tap, col)
//   y = dot * scale[k] + bias[k]   (two roundings, like torch; scale/bias optional)
// computed straight from the mma accumulators in registers: a binary conv's depth is short
// (Q*32 bits per output, one 256-bit mma step per 8 words), so the per-output epilogue, not
// the mma, sets the speed, and it is kept to a few instructions per output.  The thread of
// lane (g, t) holds rows g and g + 8 of each m-tile and columns 2t, 2t + 1 of each n-tile
// (the m16n8 accumulator layout).  Float output is stored at once (per instruction, 8
// consecutive pixels of 4 channels: whole 32-byte sectors of NCHW); the sign bits of a row's
// 32 columns come from the 4 lanes of its group, 8 bits each, and are OR-ed into the row's
// word in shared memory, from which the packed words are assembled at the end (a word shared
// with another block, at a group or channel-tile boundary, is OR-ed into the zeroed output).
template <class Tile, class Ctx>
BNAS_HD void conv_epilogue(const ConvArgs& a, const BlockPos& b, const ConvSmem& L, ConvRegs<Tile>& R, Ctx& ctx) {
  const ConvShape& s = a.s;
  uint8_t* sm = ctx.smem();
  const int tid = ctx.tid();
  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp % Tile::WARPS_M, wn = warp / Tile::WARPS_M;
  const int g = lane >> 2, t = lane & 3;
  int* px_part = reinterpret_cast<int*>(sm + L.px_part);
  int* row_popx = reinterpret_cast<int*>(sm + L.row_popx);
  const int* wsum = reinterpret_cast<const int*>(sm + L.wsum);
  const float* col_scale = reinterpret_cast<const float*>(sm + L.col_scale);
  const float* col_bias = reinterpret_cast<const float*>(sm + L.col_bias);
  const int* row_out = reinterpret_cast<const int*>(sm + L.row_out);
  const uint64_t* row_mask = reinterpret_cast<const uint64_t*>(sm + L.row_mask);
  uint32_t* sign_rows = reinterpret_cast<uint32_t*>(sm + L.sign_rows);
  float* BNAS_RESTRICT out = a.out;

  // popc(x) of each row: the 4 lanes of a group each counted 2 of every 8 words
  if (wn == 0) {
BNAS_UNROLL
    for (int mt = 0; mt < Tile::MT; ++mt) {
      const int row = wm * Tile::WM + mt * kMmaM + g;
      px_part[row * 4 + t] = R.px[mt][0];
      px_part[(row + 8) * 4 + t] = R.px[mt][1];
    }
  }
  ctx.sync();
  for (int row = tid; row < Tile::BM; row += Tile::THREADS)
    row_popx[row] = px_part[row * 4] + px_part[row * 4 + 1] + px_part[row * 4 + 2] + px_part[row * 4 + 3];
  ctx.sync();

  constexpr int WORDS = Tile::WN / 32;            // sign words per warp row
  constexpr int NT_PER_WORD = 32 / kMmaN;
  const int kbase = b.g * s.Kg + b.n0;
  const int col0 = wn * Tile::WN + 2 * t;         // this lane's column of n-tile 0
  const int* wtot = wsum + s.T * Tile::BN;
BNAS_UNROLL
  for (int mt = 0; mt < Tile::MT; ++mt) {
BNAS_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int row = wm * Tile::WM + mt * kMmaM + g + 8 * half;
      const int ro = row_out[row];
      if (ro < 0) continue;   // no pixel
      const int row_term = 2 * row_popx[row];
      int dot[Tile::NT][2];
BNAS_UNROLL
      for (int nt = 0; nt < Tile::NT; ++nt)
BNAS_UNROLL
        for (int j = 0; j < 2; ++j)
          dot[nt][j] = 4 * R.acc[mt][nt][2 * half + j] - row_term - wtot[col0 + nt * kMmaN + j];
      // taps of this pixel in the zero padding: their weights were counted in the total
      for (uint64_t mask = row_mask[row]; mask; mask &= mask - 1) {
        const int* tap_sum = wsum + lowest_bit64(mask) * Tile::BN + col0;
BNAS_UNROLL
        for (int nt = 0; nt < Tile::NT; ++nt)
BNAS_UNROLL
          for (int j = 0; j < 2; ++j) dot[nt][j] += tap_sum[nt * kMmaN + j];
      }
      uint32_t bits[WORDS];
BNAS_UNROLL
      for (int w = 0; w < WORDS; ++w) bits[w] = 0;
BNAS_UNROLL
      for (int nt = 0; nt < Tile::NT; ++nt)
BNAS_UNROLL
        for (int j = 0; j < 2; ++j) {
          const int col = col0 + nt * kMmaN + j;
          // without scale / bias the prologue left 1 and 0: exact for a float from an int
          // (x * 1 = x, and x + 0 = x for every x but -0, which an int never converts to)
          const float y = add_rn(mul_rn(static_cast<float>(dot[nt][j]), col_scale[col]), col_bias[col]);
          const bool real = col < b.ncols;
          if (out && real) ctx.st(out + ro + (int64_t)(kbase + col) * s.OHW, y);
          if (real && y >= 0.0f) bits[nt / NT_PER_WORD] |= 1u << ((nt % NT_PER_WORD) * kMmaN + 2 * t + j);
        }
      if (a.out_packed) {
BNAS_UNROLL
        for (int w = 0; w < WORDS; ++w)
          if (bits[w]) ctx.atomic_or_shared(sign_rows + row * Tile::OUT_WORDS + wn * WORDS + w, bits[w]);
      }
    }
  }
  if (!a.out_packed) return;
  ctx.sync();   // every lane's sign bits are in

  // Assemble packed words: the block owns channels [kb0, kb1) of the output.  A word whose
  // real channels all belong to this block is stored; a word shared with another block is
  // OR-ed into the zeroed output.
  const int kb0 = kbase, kb1 = kbase + b.ncols;
  const int wlo = out_word_of(s, kb0), nw = out_word_of(s, kb1 - 1) - wlo + 1;
  for (int i = tid; i < Tile::BM * nw; i += Tile::THREADS) {
    const int row = i / nw, wi = wlo + i % nw;
    if (row_out[row] < 0) continue;
    const int go = wi / s.out_Wg, wo = wi % s.out_Wg;
    const int k0 = go * s.out_Kg + wo * 32, nbits = imin(32, s.out_Kg - wo * 32);
    const int lo = imax(k0, kb0), hi = imin(k0 + nbits, kb1);
    if (lo >= hi) continue;
    const uint32_t word = row_bits(sign_rows + row * Tile::OUT_WORDS, Tile::OUT_WORDS, lo - kb0, hi - lo) << (lo - k0);
    uint32_t* dst = a.out_packed + (int64_t)(b.m0 + row) * s.out_GW + wi;
    if (lo == k0 && hi == k0 + nbits) ctx.st(dst, word);
    else if (word) ctx.atomic_or(dst, word);
  }
}

// Split-K: adds this block's partial sums into its tile's slot of split_acc; the block that
// arrives last (counted in split_count) reads the complete sums back into its registers and
// returns true: it runs the epilogue.  (Device-wide ordering: atomics, then a fence, then the
// counter; the last block fences again and reads through L2.)
template <class Tile, class Ctx>
BNAS_HD bool conv_split_reduce(const ConvArgs& a, const ConvSmem& L, ConvRegs<Tile>& R, Ctx& ctx) {
  const int tile = ctx.block_y() * ceil_div(a.s.M, Tile::BM) + ctx.block_x();
  int32_t* acc_ws = a.split_acc + (int64_t)tile * (Tile::BM * Tile::BN + Tile::BM);
  int32_t* px_ws = acc_ws + Tile::BM * Tile::BN;
  const int tid = ctx.tid(), warp = tid / 32, lane = tid % 32;
  const int wm = warp % Tile::WARPS_M, wn = warp / Tile::WARPS_M;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = wm * Tile::WM + g, col0 = wn * Tile::WN + 2 * t;
BNAS_UNROLL
  for (int mt = 0; mt < Tile::MT; ++mt)
BNAS_UNROLL
    for (int nt = 0; nt < Tile::NT; ++nt)
BNAS_UNROLL
      for (int i = 0; i < 4; ++i)
        ctx.red_add(acc_ws + (row0 + mt * kMmaM + 8 * (i >> 1)) * Tile::BN + col0 + nt * kMmaN + (i & 1), R.acc[mt][nt][i]);
  if (wn == 0) {
BNAS_UNROLL
    for (int mt = 0; mt < Tile::MT; ++mt) {
      ctx.red_add(px_ws + row0 + mt * kMmaM, R.px[mt][0]);
      ctx.red_add(px_ws + row0 + mt * kMmaM + 8, R.px[mt][1]);
    }
  }
  ctx.fence();
  ctx.sync();
  int* last = reinterpret_cast<int*>(ctx.smem() + L.flag);
  if (tid == 0) *last = ctx.atomic_add(a.split_count + tile, 1) == a.splits - 1;
  ctx.sync();
  if (!*last) return false;
  ctx.fence();
BNAS_UNROLL
  for (int mt = 0; mt < Tile::MT; ++mt)
BNAS_UNROLL
    for (int nt = 0; nt < Tile::NT; ++nt)
BNAS_UNROLL
      for (int i = 0; i < 4; ++i)
        R.acc[mt][nt][i] = ctx.ld_l2(acc_ws + (row0 + mt * kMmaM + 8 * (i >> 1)) * Tile::BN + col0 + nt * kMmaN + (i & 1));
  if (wn == 0) {   // the epilogue adds the 4 lanes' counts: lane t = 0 carries the whole sum
BNAS_UNROLL
    for (int mt = 0; mt < Tile::MT; ++mt) {
      R.px[mt][0] = t == 0 ? ctx.ld_l2(px_ws + row0 + mt * kMmaM) : 0;
      R.px[mt][1] = t == 0 ? ctx.ld_l2(px_ws + row0 + mt * kMmaM + 8) : 0;
    }
  }
  return true;
}

// The whole block: prologue, cp.async pipeline over the depth, epilogue.
template <class Tile, class Ctx>
BNAS_HD void xnor_conv_block(const ConvArgs& a, Ctx& ctx) {
  const ConvShape& s = a.s;
  const ConvSmem L = conv_smem_layout<Tile>(s.T);
  const BlockPos b = conv_block_pos<Tile>(s, ctx);
  ConvRegs<Tile> R;
  for (int mt = 0; mt < Tile::MT; ++mt) {
    R.px[mt][0] = R.px[mt][1] = 0;
    for (int nt = 0; nt < Tile::NT; ++nt)
      for (int i = 0; i < 4; ++i) R.acc[mt][nt][i] = 0;
  }
  // this block's depth slice [kt0, kt1) in stages of BKW words (all of it without split-K)
  const int KT = ceil_div(s.Q, Tile::BKW);
  const int splits = Tile::SPLIT_K ? a.splits : 1, slice = Tile::SPLIT_K ? ctx.block_z() : 0;
  const int kt0 = (int)((int64_t)slice * KT / splits), kt1 = (int)((int64_t)(slice + 1) * KT / splits);
  const int q0 = kt0 * Tile::BKW + (ctx.tid() % Tile::CHUNKS) * Tile::VW;
  R.a_tap = q0 / s.Wg;
  R.a_word = q0 % s.Wg;
  R.a_tap_bit = R.a_tap < 64 ? (uint64_t)1 << R.a_tap : 0;
  R.a_dt = Tile::BKW / s.Wg;
  R.a_dw = Tile::BKW % s.Wg;

  conv_prologue_rows<Tile>(s, b, L, ctx);
  ctx.sync();
  const int nkt = kt1 - kt0;
  for (int st = 0; st < Tile::STAGES - 1; ++st) {
    if (st < nkt) conv_load_stage<Tile>(a, b, L, R, st, kt0 + st, ctx);
    ctx.cp_commit();
  }
  conv_prologue_weights<Tile>(a, b, L, ctx);   // overlaps the copies in flight
  ctx.sync();
  conv_prologue_weight_totals<Tile>(s, L, ctx);
  for (int i = 0; i < nkt; ++i) {
    ctx.template cp_wait<Tile::STAGES - 2>();
    ctx.sync();   // stage i visible to all; everyone is done with stage i-1's buffer
    const int ni = i + Tile::STAGES - 1;
    if (ni < nkt) conv_load_stage<Tile>(a, b, L, R, ni % Tile::STAGES, kt0 + ni, ctx);
    ctx.cp_commit();
    const int nks = ceil_div(imin(Tile::BKW, s.Q - (kt0 + i) * Tile::BKW), kMmaKWords);
    conv_compute_stage<Tile>(L, R, i % Tile::STAGES, nks, ctx);
  }
  ctx.template cp_wait<0>();
  ctx.sync();
  if (Tile::SPLIT_K && a.splits > 1 && !conv_split_reduce<Tile>(a, L, R, ctx)) return;
  conv_epilogue<Tile>(a, b, L, R, ctx);
}

// ----------------------------------------------------------------------------------------
// Packed activations with stray bits past the channel count (Cg % 32 != 0) would count in
// popc(x): the launcher first copies them with those bits cleared, one thread per word.
// (Stray bits in the weights need nothing: AND with clean activations drops them, and the
// tap sums below ignore them.)
template <class Ctx>
BNAS_HD void clear_tail_bits_word(const uint32_t* in, uint32_t* out, int Wg, uint32_t tail, int64_t idx, Ctx& ctx) {
  const uint32_t v = ctx.ld(in + idx);
  ctx.st(out + idx, idx % Wg == Wg - 1 ? v & tail : v);
}

// ----------------------------------------------------------------------------------------
// Tap sums of the packed weights, 2*popc(w[k][tap]) - Cg per (channel, tap): one thread per
// entry, computed once per weight tensor (the conv kernel only reads them).  Padding bits past
// Cg in the last word of a tap are ignored.
struct TapSumArgs {
  const uint32_t* w;        // (K, KH, KW, Wg)
  int32_t* out;             // (K, KH*KW)
  int T, Wg, Cg;
  int64_t total;            // K*T
};

template <class Ctx>
BNAS_HD void conv_tap_sum(const TapSumArgs& p, int64_t idx, Ctx& ctx) {
  const uint32_t* wp = p.w + idx * p.Wg;
  int pc = 0;
  for (int j = 0; j + 1 < p.Wg; ++j) pc += popc32(ctx.ld(wp + j));
  pc += popc32(ctx.ld(wp + p.Wg - 1) & tail_word_mask(p.Cg));
  ctx.st(p.out + idx, 2 * pc - p.Cg);
}

// ----------------------------------------------------------------------------------------
// Fused sign + bit-packing of a float tensor (any strides) into the packed NHWC format:
// one thread per output word, consecutive threads on consecutive w (coalesced reads along W
// for NCHW input).  Also packs weights: (K, Cg, KH, KW) is "N=K, C=Cg, H=KH, W=KW, groups=1".
struct PackArgs {
  const void* x;
  int64_t sn, sc, sh, sw;   // element strides of x
  int N, C, H, W, G, Cg, Wg, GW;
  uint32_t* out;            // (N, H, W, GW)
  int64_t total;            // N*H*W*GW words
};

inline const char* pack_args_init(PackArgs& p, int N, int C, int H, int W, int G) {
  if (N < 1 || C < 1 || H < 1 || W < 1 || G < 1) return "pack: empty tensor";
  if (C % G != 0) return "pack: channels must be divisible by groups";
  p.N = N; p.C = C; p.H = H; p.W = W; p.G = G;
  p.Cg = C / G; p.Wg = ceil_div(p.Cg, 32); p.GW = G * p.Wg;
  p.total = (int64_t)N * H * W * p.GW;
  return nullptr;
}

// sign(0) = +1 (also -0.0), NaN -> -1, exactly like torch.where(x >= 0, 1, -1).
BNAS_HD bool sign_is_plus(float v) { return v >= 0.0f; }

// The same rule on the raw bits of an IEEE half (exp_bits 5, man_bits 10) or bfloat16
// (8, 7): +1 for a clear sign bit unless NaN, and for -0.  Shared by the device and the
// host emulator, so the emulator tests the 16-bit path the GPU runs.
BNAS_HD bool sign_is_plus_bits16(uint16_t v, int man_bits) {
  const uint16_t magnitude = v & 0x7fffu;
  const uint16_t inf = (uint16_t)(0x7fffu >> man_bits << man_bits);   // exponent all ones, mantissa 0
  if (magnitude > inf) return false;                                  // NaN
  return !(v & 0x8000u) || magnitude == 0;
}
constexpr int kHalfManBits = 10, kBf16ManBits = 7;

#ifdef __CUDACC__
__device__ __forceinline__ bool sign_is_plus(__half v) { return sign_is_plus_bits16(__half_as_ushort(v), kHalfManBits); }
__device__ __forceinline__ bool sign_is_plus(__nv_bfloat16 v) {
  return sign_is_plus_bits16(__bfloat16_as_ushort(v), kBf16ManBits);
}
#endif

template <class T, class Ctx>
BNAS_HD void pack_signs_word(const PackArgs& p, int64_t idx, Ctx& ctx) {
  const int w = (int)(idx % p.W);
  int64_t r = idx / p.W;
  const int h = (int)(r % p.H); r /= p.H;
  const int gw = (int)(r % p.GW);
  const int n = (int)(r / p.GW);
  const int g = gw / p.Wg, wd = gw % p.Wg;
  const int c0 = wd * 32, nbits = imin(32, p.Cg - c0);
  const T* base = static_cast<const T*>(p.x) + n * p.sn + h * p.sh + w * p.sw + (int64_t)(g * p.Cg + c0) * p.sc;
  uint32_t word = 0;
  for (int j = 0; j < nbits; ++j)
    if (sign_is_plus(ctx.ld(base + j * p.sc))) word |= (uint32_t)1 << j;
  ctx.st(p.out + ((int64_t)(n * p.H + h) * p.W + w) * p.GW + gw, word);
}

}  // namespace bnas_cuda
