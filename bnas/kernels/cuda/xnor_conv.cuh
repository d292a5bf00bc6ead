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
  const float* scale;         // (K) or null: y = dot * scale
  const float* bias;          // (K) or null: y = ... + bias
  float* out;                 // (N, K, OH, OW) float or null
  uint32_t* out_packed;       // (N, OH, OW, out_GW) or null; zeroed first if packed_output_needs_zeroing
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
template <int BM_, int BN_, int WM_, int WN_, int BKW_, int STAGES_, int VW_>
struct ConvTile {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, BKW = BKW_, STAGES = STAGES_, VW = VW_;
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN, WARPS = WARPS_M * WARPS_N;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int MT = WM / kMmaM, NT = WN / kMmaN, KSTEPS = BKW / kMmaKWords;
  static constexpr int CHUNKS = BKW / VW;                  // copies per tile row per stage
  static constexpr int A_ITERS = BM * CHUNKS / THREADS;    // copies per thread per stage
  static constexpr int B_ITERS = BN * CHUNKS / THREADS;
  static constexpr int ROWS_PER_LINE = BKW >= 32 ? 1 : 32 / BKW;   // tile rows per 128-byte bank line
  static constexpr int OCTS = BKW / 8;                             // 8-word (32-byte) chunks per row
  static constexpr int STAGE_WORDS = (BM + BN) * BKW;
  static_assert(BM % WM == 0 && BN % WN == 0 && WM % kMmaM == 0 && WN % kMmaN == 0, "warp tiling");
  static_assert(BKW % 8 == 0 && (OCTS & (OCTS - 1)) == 0 && BKW <= 32, "stage depth: 8, 16 or 32 words");
  static_assert(VW == 1 || VW == 2 || VW == 4, "copy width");
  static_assert(THREADS % CHUNKS == 0 && (BM * CHUNKS) % THREADS == 0 && (BN * CHUNKS) % THREADS == 0, "copy split");
  static_assert(BN % 32 == 0, "packed-output staging assumes BN multiple of 32");
  static_assert(BM <= THREADS && BN <= THREADS, "one thread per row in the prologue");
  static_assert(STAGES >= 2, "pipeline");
};

// Shared-memory word offset of (row, word) in one operand tile of a stage.  8-word octets are
// XOR-swizzled by row so that the 64-bit fragment loads of a half-warp (4 rows x 8 words)
// hit 32 distinct banks.
template <class Tile>
BNAS_HD int tile_word(int row, int word) {
  const int oct = (word >> 3) ^ ((row / Tile::ROWS_PER_LINE) & (Tile::OCTS - 1));
  return row * Tile::BKW + (oct << 3) + (word & 7);
}

// Shared memory layout (bytes), a function of the tap count only.
struct ConvSmem {
  int pipe, row_mask, wsum, tap_off, row_base, row_ih0, row_iw0, row_out, px_part, total;
};

template <class Tile>
BNAS_HD ConvSmem conv_smem_layout(int T) {
  ConvSmem L;
  int off = 0;
  L.pipe = off;      off += Tile::STAGES * Tile::STAGE_WORDS * 4;
  L.row_mask = off;  off += Tile::BM * 8;               // uint64 padded-tap mask per pixel
  L.wsum = off;      off += (T + 1) * Tile::BN * 4;     // wsum[tap][col], row T = sum over taps
  L.tap_off = off;   off += T * 4;                      // (r*DH) << 16 | (s*DW)
  L.row_base = off;  off += Tile::BM * 4;               // word offset of (n, 0, 0, group), -1 = no pixel
  L.row_ih0 = off;   off += Tile::BM * 4;
  L.row_iw0 = off;   off += Tile::BM * 4;
  L.row_out = off;   off += Tile::BM * 4;               // n*K*OHW + oh*OW + ow
  L.px_part = off;   off += Tile::BM * 4 * 4;           // popc(x) partial sums, 4 lanes per row
  L.total = off;
  return L;
}

// 64-bit shared-memory load of two adjacent words (one LDS.64 on the device).
BNAS_HD void load_word_pair(const uint32_t* p, uint32_t& lo, uint32_t& hi) {
#ifdef __CUDA_ARCH__
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  lo = v.x; hi = v.y;
#else
  lo = p[0]; hi = p[1];
#endif
}

// ----------------------------------------------------------------------------------------
// Per-thread registers of the conv kernel.
template <class Tile>
struct ConvRegs {
  int32_t acc[Tile::MT][Tile::NT][4];
  int32_t px[Tile::MT][2];        // popc of this lane's A words, rows g and g+8
  int a_tap, a_word;              // depth position of this thread's A copies (advances by BKW)
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
  int* tap_off = reinterpret_cast<int*>(sm + L.tap_off);
  const int tid = ctx.tid();
  for (int t = tid; t < s.T; t += Tile::THREADS)
    tap_off[t] = (((t / s.KW) * s.DH) << 16) | ((t % s.KW) * s.DW);
  if (tid < Tile::BM) {
    int* row_base = reinterpret_cast<int*>(sm + L.row_base);
    int* row_ih0 = reinterpret_cast<int*>(sm + L.row_ih0);
    int* row_iw0 = reinterpret_cast<int*>(sm + L.row_iw0);
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
      row_base[tid] = n * s.H * s.W * s.GW + b.g * s.Wg;
      row_ih0[tid] = ih0;
      row_iw0[tid] = iw0;
      row_out[tid] = n * s.K * s.OHW + ohw;
      row_mask[tid] = mask;
    } else {
      row_base[tid] = -1;
      row_ih0[tid] = 0;
      row_iw0[tid] = 0;
      row_out[tid] = -1;
      row_mask[tid] = 0;
    }
  }
}

// Prologue, per (channel, tap): wsum = 2*popc(w) - Cg.  Runs while the first pipeline stages
// are in flight.  Consecutive threads read consecutive taps of one channel (contiguous words).
template <class Tile, class Ctx>
BNAS_HD void conv_prologue_weights(const ConvArgs& a, const BlockPos& b, const ConvSmem& L, Ctx& ctx) {
  const ConvShape& s = a.s;
  int* wsum = reinterpret_cast<int*>(ctx.smem() + L.wsum);
  for (int i = ctx.tid(); i < Tile::BN * s.T; i += Tile::THREADS) {
    const int col = i / s.T, tap = i % s.T;
    int v = 0;
    if (col < b.ncols) {
      const uint32_t* wp = a.w + (int64_t)(b.g * s.Kg + b.n0 + col) * s.Q + tap * s.Wg;
      int pc = 0;
      for (int j = 0; j < s.Wg; ++j) pc += popc32(ctx.ld(wp + j));
      v = 2 * pc - s.Cg;
    }
    wsum[tap * Tile::BN + col] = v;
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
  const int* tap_off = reinterpret_cast<const int*>(sm + L.tap_off);
  const int* row_base = reinterpret_cast<const int*>(sm + L.row_base);
  const int* row_ih0 = reinterpret_cast<const int*>(sm + L.row_ih0);
  const int* row_iw0 = reinterpret_cast<const int*>(sm + L.row_iw0);
  const int tid = ctx.tid();
  const int c = (tid % Tile::CHUNKS) * Tile::VW;        // word within the stage, fixed per thread
  const int row0 = tid / Tile::CHUNKS;
  constexpr int ROW_STEP = Tile::THREADS / Tile::CHUNKS;

  // A: input words of tap R.a_tap, word R.a_word (the same for all rows of this thread)
  const bool tap_ok = R.a_tap < s.T;
  const int toff = tap_ok ? tap_off[R.a_tap] : 0;
  const int dr = toff >> 16, ds = toff & 0xffff;
BNAS_UNROLL
  for (int i = 0; i < Tile::A_ITERS; ++i) {
    const int row = row0 + i * ROW_STEP;
    const int base = row_base[row];
    const int ih = row_ih0[row] + dr, iw = row_iw0[row] + ds;
    const bool ok = tap_ok && base >= 0 && ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
    const uint32_t* src = ok ? a.x + base + (ih * s.W + iw) * s.GW + R.a_word : a.x;
    ctx.template cp_async<Tile::VW * 4>(As + tile_word<Tile>(row, c), src, ok);
  }
  // B: weight words, contiguous along the depth
  const int q = kt * Tile::BKW + c;
BNAS_UNROLL
  for (int i = 0; i < Tile::B_ITERS; ++i) {
    const int col = row0 + i * ROW_STEP;
    const bool ok = col < b.ncols && q < s.Q;
    const uint32_t* src = ok ? a.w + (int64_t)(b.g * s.Kg + b.n0 + col) * s.Q + q : a.w;
    ctx.template cp_async<Tile::VW * 4>(Bs + tile_word<Tile>(col, c), src, ok);
  }
  // advance this thread's depth position by BKW words: BKW = dt*Wg + dw
  const int dt = Tile::BKW / s.Wg, dw = Tile::BKW % s.Wg;
  R.a_tap += dt;
  R.a_word += dw;
  if (R.a_word >= s.Wg) { R.a_word -= s.Wg; ++R.a_tap; }
}

// Fragments of one 256-bit depth step.  Lane (g, t) takes the adjacent words 2t, 2t+1 of the
// step's 8 words with one 64-bit load: A rows g and g+8, B column g.  By the PTX layout
// (mma_b1.cuh) A registers 0/1 and B register 0 cover k-slots [32t, 32t+32), A registers 2/3
// and B register 1 cover [128+32t, 128+32t+32).  So word 2t of a row meets word 2t of a column
// and word 2t+1 meets word 2t+1: a consistent permutation of the depth, the same dot product.
template <class Tile, class Ctx>
BNAS_HD void conv_compute_stage(const ConvSmem& L, ConvRegs<Tile>& R, int stage, Ctx& ctx) {
  const uint32_t* As = reinterpret_cast<const uint32_t*>(ctx.smem() + L.pipe) + stage * Tile::STAGE_WORDS;
  const uint32_t* Bs = As + Tile::BM * Tile::BKW;
  const int warp = ctx.tid() / 32, lane = ctx.tid() % 32;
  const int wm = warp % Tile::WARPS_M, wn = warp / Tile::WARPS_M;
  const int g = lane >> 2, t = lane & 3;
BNAS_UNROLL
  for (int ks = 0; ks < Tile::KSTEPS; ++ks) {
    const int word = ks * 8 + 2 * t;
    uint32_t af[Tile::MT][4], bf[Tile::NT][2];
BNAS_UNROLL
    for (int mt = 0; mt < Tile::MT; ++mt) {
      const int row = wm * Tile::WM + mt * kMmaM + g;
      load_word_pair(As + tile_word<Tile>(row, word), af[mt][0], af[mt][2]);
      load_word_pair(As + tile_word<Tile>(row + 8, word), af[mt][1], af[mt][3]);
    }
BNAS_UNROLL
    for (int nt = 0; nt < Tile::NT; ++nt) {
      const int col = wn * Tile::WN + nt * kMmaN + g;
      load_word_pair(Bs + tile_word<Tile>(col, word), bf[nt][0], bf[nt][1]);
    }
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
      for (int nt = 0; nt < Tile::NT; ++nt) ctx.mma(R.acc[mt][nt], af[mt], bf[nt]);
  }
}

// Integer result of one output element from its accumulator (see the identity at the top).
BNAS_HD int conv_dot(int acc, int popx, uint64_t pad_mask, const int* wsum, int T, int BN, int col) {
  int dot = 4 * acc - 2 * popx - wsum[T * BN + col];
  while (pad_mask) {
    dot += wsum[lowest_bit64(pad_mask) * BN + col];
    pad_mask &= pad_mask - 1;
  }
  return dot;
}

BNAS_HD float conv_epilogue_value(const ConvArgs& a, int dot, int k) {
  float y = static_cast<float>(dot);
  if (a.scale) y = mul_rn(y, a.scale[k]);
  if (a.bias) y = add_rn(y, a.bias[k]);
  return y;
}

// Output word (within a pixel) and bit of global channel k in the packed-output format.
BNAS_HD int out_word_of(const ConvShape& s, int k) { return (k / s.out_Kg) * s.out_Wg + (k % s.out_Kg) / 32; }

template <class Tile, class Ctx>
BNAS_HD void conv_epilogue(const ConvArgs& a, const BlockPos& b, const ConvSmem& L, ConvRegs<Tile>& R, Ctx& ctx) {
  const ConvShape& s = a.s;
  uint8_t* sm = ctx.smem();
  const int tid = ctx.tid();
  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp % Tile::WARPS_M, wn = warp / Tile::WARPS_M;
  const int g = lane >> 2, t = lane & 3;
  int* px_part = reinterpret_cast<int*>(sm + L.px_part);
  const int* wsum = reinterpret_cast<const int*>(sm + L.wsum);
  const int* row_base = reinterpret_cast<const int*>(sm + L.row_base);
  const int* row_out = reinterpret_cast<const int*>(sm + L.row_out);
  const uint64_t* row_mask = reinterpret_cast<const uint64_t*>(sm + L.row_mask);

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

  uint8_t* bits = sm + L.pipe;   // the pipeline buffers are free now: stage sign bits [BM][BN]
  const int kbase = b.g * s.Kg + b.n0;
BNAS_UNROLL
  for (int mt = 0; mt < Tile::MT; ++mt) {
BNAS_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int row = wm * Tile::WM + mt * kMmaM + g + 8 * half;
      if (row_base[row] < 0) continue;
      const int popx = px_part[row * 4] + px_part[row * 4 + 1] + px_part[row * 4 + 2] + px_part[row * 4 + 3];
      const uint64_t mask = row_mask[row];
BNAS_UNROLL
      for (int nt = 0; nt < Tile::NT; ++nt) {
BNAS_UNROLL
        for (int j = 0; j < 2; ++j) {
          const int col = wn * Tile::WN + nt * kMmaN + 2 * t + j;
          if (col >= b.ncols) continue;
          const int dot = conv_dot(R.acc[mt][nt][2 * half + j], popx, mask, wsum, s.T, Tile::BN, col);
          const int k = kbase + col;
          const float y = conv_epilogue_value(a, dot, k);
          if (a.out) ctx.st(a.out + row_out[row] + (int64_t)k * s.OHW, y);
          if (a.out_packed) bits[row * Tile::BN + col] = y >= 0.0f ? 1 : 0;
        }
      }
    }
  }
  if (!a.out_packed) return;
  ctx.sync();

  // Assemble packed words: the block owns channels [kb0, kb1) of the output.  A word whose
  // real channels all belong to this block is stored; a word shared with another block (a
  // group boundary inside a word) is OR-ed into the zeroed output.
  const int kb0 = kbase, kb1 = kbase + b.ncols;
  const int wlo = out_word_of(s, kb0), nw = out_word_of(s, kb1 - 1) - wlo + 1;
  for (int i = tid; i < Tile::BM * nw; i += Tile::THREADS) {
    const int row = i / nw, wi = wlo + i % nw;
    if (row_base[row] < 0) continue;
    const int go = wi / s.out_Wg, wo = wi % s.out_Wg;
    const int k0 = go * s.out_Kg + wo * 32, nbits = imin(32, s.out_Kg - wo * 32);
    uint32_t word = 0;
    bool whole = true;
    for (int j = 0; j < nbits; ++j) {
      const int k = k0 + j;
      if (k >= kb0 && k < kb1) word |= (uint32_t)bits[row * Tile::BN + (k - kb0)] << j;
      else whole = false;
    }
    uint32_t* dst = a.out_packed + (int64_t)(b.m0 + row) * s.out_GW + wi;
    if (whole) ctx.st(dst, word);
    else if (word) ctx.atomic_or(dst, word);
  }
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
  const int c = (ctx.tid() % Tile::CHUNKS) * Tile::VW;
  R.a_tap = c / s.Wg;
  R.a_word = c % s.Wg;

  conv_prologue_rows<Tile>(s, b, L, ctx);
  ctx.sync();
  const int KT = ceil_div(s.Q, Tile::BKW);
  for (int st = 0; st < Tile::STAGES - 1; ++st) {
    if (st < KT) conv_load_stage<Tile>(a, b, L, R, st, st, ctx);
    ctx.cp_commit();
  }
  conv_prologue_weights<Tile>(a, b, L, ctx);   // overlaps the copies in flight
  ctx.sync();
  conv_prologue_weight_totals<Tile>(s, L, ctx);
  for (int kt = 0; kt < KT; ++kt) {
    ctx.template cp_wait<Tile::STAGES - 2>();
    ctx.sync();   // stage kt visible to all; everyone is done with stage kt-1's buffer
    const int nk = kt + Tile::STAGES - 1;
    if (nk < KT) conv_load_stage<Tile>(a, b, L, R, nk % Tile::STAGES, nk, ctx);
    ctx.cp_commit();
    conv_compute_stage<Tile>(L, R, kt % Tile::STAGES, ctx);
  }
  ctx.template cp_wait<0>();
  ctx.sync();
  conv_epilogue<Tile>(a, b, L, R, ctx);
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
#ifdef __CUDACC__
// Explicit conversions: torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__.
__device__ __forceinline__ bool sign_is_plus(__half v) { return __half2float(v) >= 0.0f; }
__device__ __forceinline__ bool sign_is_plus(__nv_bfloat16 v) { return __bfloat162float(v) >= 0.0f; }
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
