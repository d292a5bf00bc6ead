// XNOR-popcount convolution and linear kernels for x86 CPUs.
//
// One binary, three code paths chosen at run time (the caller passes the ISA it wants; the
// Python side checks `isa_supported` first):
//   ISA_AVX512  AVX-512 VPOPCNTDQ, 16 output channels per zmm register
//   ISA_AVX2    AVX2, popcount by a nibble lookup table (pshufb), 8 channels per ymm
//   ISA_POPCNT  scalar 64-bit popcnt, 4 output channels per step
//
// Packed format (see KERNELS_CONTRACT): int32 words along channels, bit 1 = +1, NHWC, group g
// in words [g*Wg, (g+1)*Wg), padding bits 0. Because padding bits are 0 in both operands,
// dot = K_valid - 2 * popc(x XOR w), where K_valid counts only the taps inside the image
// (zero padding contributes 0, so out-of-image taps are skipped, never read as -1).
//
// Convolution is an implicit GEMM: for every output position the reduction runs over
// "segments" of contiguous words (one per valid tap, or one per tap row when the taps of a
// row are adjacent in memory). Output channels sit in SIMD lanes ("vectors" of L channels):
// 4 vectors per step reuse each broadcast input word, and 4 output positions per step reuse
// each weight load, with all 16 accumulators in registers. The epilogue (scale, bias, float
// store or sign + pack) is fused into the same step. The work pool (work_pool.h) splits
// (channel block, output row) items, so a thread keeps one block's weights in L1 while it
// walks the rows.
#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "linear_rows.h"
#include "pointwise_conv.h"
#include "program_runner.h"
#include "program_torch_ops.h"
#include "register_blocks.h"
#include "stem_conv.h"
#include "work_pool.h"

namespace {

enum Isa : int { ISA_POPCNT = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

bool isa_supported(int64_t isa) {
  __builtin_cpu_init();
  switch (isa) {
    case ISA_AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vpopcntdq");
    case ISA_AVX2:
      return __builtin_cpu_supports("avx2");
    case ISA_POPCNT:
      return __builtin_cpu_supports("popcnt");
    default:
      return false;
  }
}

int lanes_of(int isa) { return isa == ISA_AVX512 ? 16 : (isa == ISA_AVX2 ? 8 : 1); }

// Output channel vectors per step (register blocking): 4 x 16 channels for AVX-512 with 4
// positions uses 16 accumulators of the 32 zmm registers.
constexpr int kVectorsPerBlock = 4;

struct Geometry {
  int64_t N, H, W;        // input
  int64_t G, Cg, Wg;      // groups, channels per group, words per group
  int64_t Ctot;           // words per input pixel = G * Wg
  int64_t K, Kg;          // output channels, per group
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t OH, OW;
};

// A run of `len` contiguous words: input at base + x_off, weights at w + w_off * L.
struct Segment {
  int64_t x_off;
  int64_t w_off;
  int64_t len;
};

struct Epilogue {
  const float* scale;     // K or nullptr
  const float* bias;      // K or nullptr
  const float* residual;  // (pixels, K) NHWC float added last (a shortcut), or nullptr
  float* out_f;           // (pixels, K) NHWC float, or nullptr
  int32_t* out_p;         // (pixels, Kw) packed signs, or nullptr (both may be set: the float
                          // result feeds a shortcut, its signs the next binary layer)
  const float* pack_threshold;  // K or nullptr: a packed bit is v >= pack_threshold[k], the
                                // next layer's sign(v - threshold), else v >= 0
  // ReActNet's RPReLU after the residual (K each, or all nullptr): v - shift_in, times slope
  // where negative, + shift_out, one rounding per op as PyTorch's elementwise ops make them
  const float* rprelu_shift_in;
  const float* rprelu_slope;
  const float* rprelu_shift_out;
  int64_t K;              // output channels
  int64_t Kw;             // words per packed output pixel
  bool atomic_bits;       // this block shares packed words with another block
};

// One step of work: P output positions x (up to Q vectors of L) output channels.
struct Block {
  const int32_t* x[4];    // per position: input base the segment offsets are relative to
  int64_t pos[4];         // per position: output pixel index
  int64_t kvalid[4];      // per position: real +-1 terms summed (taps inside the image)
  const int32_t* w;       // weights of the block's first vector
  int64_t vstride;        // words between consecutive vectors
  const Segment* segs;
  int nseg;
  int64_t k0;             // first output channel of the block
  int64_t nch;            // output channels in the block (<= Q * L)
};

// ORs up to 64 sign bits into a packed row starting at bit k0.
inline void or_bits(int32_t* row, int64_t k0, uint64_t bits, bool atomic) {
  if (bits == 0) return;
  const unsigned __int128 v = static_cast<unsigned __int128>(bits) << (k0 & 31);
  uint32_t* words = reinterpret_cast<uint32_t*>(row) + (k0 >> 5);
  for (int i = 0; i < 3; ++i) {
    const uint32_t part = static_cast<uint32_t>(v >> (32 * i));
    if (part == 0) continue;
    if (atomic)
      __atomic_fetch_or(words + i, part, __ATOMIC_RELAXED);
    else
      words[i] |= part;
  }
}

// value = K_valid - 2 * popcount, then * scale + bias (+ residual) (one rounding per step, no
// FMA: it matches the float computation conv -> BN -> add bit for bit), stored as float NHWC
// and/or as packed signs.
// acc holds P rows of `stride` counts, channel c of the block at [p * stride + c].
inline void epilogue_scalar(const int32_t* acc, int P, int64_t stride, const Block& b,
                            const Epilogue& e) {
  for (int p = 0; p < P; ++p) {
    uint64_t bits = 0;
    for (int64_t c = 0; c < b.nch; ++c) {
      const int64_t k = b.k0 + c;
      float v = static_cast<float>(b.kvalid[p] - 2 * static_cast<int64_t>(acc[p * stride + c]));
      if (e.scale) v = v * e.scale[k];
      if (e.bias) v = v + e.bias[k];
      if (e.residual) v = v + e.residual[b.pos[p] * e.K + k];
      if (e.rprelu_shift_in) {
        const float y = v - e.rprelu_shift_in[k];
        v = (y >= 0.0f ? y : e.rprelu_slope[k] * y) + e.rprelu_shift_out[k];
      }
      if (e.out_f) e.out_f[b.pos[p] * e.K + k] = v;
      if (v >= (e.pack_threshold ? e.pack_threshold[k] : 0.0f)) bits |= uint64_t{1} << c;
    }
    if (e.out_p) or_bits(e.out_p + b.pos[p] * e.Kw, b.k0, bits, e.atomic_bits);
  }
}

// The epilogue's per-channel vectors for 16 channels from channel k (`live` lanes).
struct EpilogueVectors {
  __mmask16 live;
  __m512 scale, bias, threshold, shift_in, slope, shift_out;
};

__attribute__((target("avx512f"))) inline __m512 channel_vector(const float* values, int64_t k, __mmask16 live,
                                                                 __m512 otherwise) {
  return values ? _mm512_maskz_loadu_ps(live, values + k) : otherwise;
}

__attribute__((target("avx512f"))) inline EpilogueVectors epilogue_vectors(const Epilogue& e, int64_t k,
                                                                           __mmask16 live) {
  const __m512 zero = _mm512_setzero_ps();
  return {live,
          channel_vector(e.scale, k, live, _mm512_set1_ps(1.0f)),
          channel_vector(e.bias, k, live, zero),
          channel_vector(e.pack_threshold, k, live, zero),
          channel_vector(e.rprelu_shift_in, k, live, zero),
          channel_vector(e.rprelu_slope, k, live, zero),
          channel_vector(e.rprelu_shift_out, k, live, zero)};
}

// epilogue_scalar on 16 channels: K_valid - 2 * popcount, * scale + bias (+ the residual at
// `at`) (-> RPReLU), the same ops in the same order, stored as floats at `at` when asked;
// returns the mask of their packed signs (0 without a packed output).
__attribute__((target("avx512f"))) inline __mmask16 epilogue_avx512(__m512i kvalid, __m512i popcounts,
                                                                    const Epilogue& e, const EpilogueVectors& c,
                                                                    int64_t at) {
  __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(kvalid, _mm512_slli_epi32(popcounts, 1)));
  if (e.scale) v = _mm512_mul_ps(v, c.scale);
  if (e.bias) v = _mm512_add_ps(v, c.bias);
  if (e.residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(c.live, e.residual + at));
  if (e.rprelu_shift_in) {
    const __m512 y = _mm512_sub_ps(v, c.shift_in);
    const __mmask16 non_negative = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GE_OQ);
    v = _mm512_add_ps(_mm512_mask_blend_ps(non_negative, _mm512_mul_ps(c.slope, y), y), c.shift_out);
  }
  if (e.out_f) _mm512_mask_storeu_ps(e.out_f + at, c.live, v);
  return e.out_p ? _mm512_mask_cmp_ps_mask(c.live, v, c.threshold, _CMP_GE_OQ) : __mmask16{0};
}

// ---------------------------------------------------------------------------------------
// Block kernels: accumulate popc(x XOR w) for P positions x Q vectors, then the epilogue.
// ---------------------------------------------------------------------------------------
template <int P, int Q>
__attribute__((target("avx512f,avx512vpopcntdq,avx512bw"))) void block_avx512(
    const Block& b, const Epilogue& e) {
  __m512i acc[P][Q];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < Q; ++q) acc[p][q] = _mm512_setzero_si512();
  for (int s = 0; s < b.nseg; ++s) {
    const int32_t* xs[P];
    for (int p = 0; p < P; ++p) xs[p] = b.x[p] + b.segs[s].x_off;
    const int32_t* ws = b.w + b.segs[s].w_off * 16;
    const int64_t len = b.segs[s].len;
    for (int64_t c = 0; c < len; ++c) {
      __m512i wv[Q];
      for (int q = 0; q < Q; ++q) wv[q] = _mm512_loadu_si512(ws + q * b.vstride + c * 16);
      for (int p = 0; p < P; ++p) {
        const __m512i xv = _mm512_set1_epi32(xs[p][c]);
        for (int q = 0; q < Q; ++q)
          acc[p][q] = _mm512_add_epi32(acc[p][q],
                                       _mm512_popcnt_epi32(_mm512_xor_si512(xv, wv[q])));
      }
    }
  }
  // Epilogue, vectorized: 16 channels per step, the per-channel vectors loaded once.
  EpilogueVectors channels[Q];
  for (int q = 0; q < Q; ++q)
    channels[q] = epilogue_vectors(e, b.k0 + 16 * q, bnas::first_lanes(std::min<int64_t>(16, b.nch - 16 * q)));
  for (int p = 0; p < P; ++p) {
    const __m512i kv = _mm512_set1_epi32(static_cast<int32_t>(b.kvalid[p]));
    uint64_t bits = 0;
    for (int q = 0; q < Q; ++q) {
      const int64_t at = b.pos[p] * e.K + b.k0 + 16 * q;
      bits |= static_cast<uint64_t>(epilogue_avx512(kv, acc[p][q], e, channels[q], at)) << (16 * q);
    }
    if (e.out_p) or_bits(e.out_p + b.pos[p] * e.Kw, b.k0, bits, e.atomic_bits);
  }
}

// Adds the byte counters into the 32-bit lanes and clears them.
template <int P, int Q>
__attribute__((target("avx2"))) inline void avx2_widen(__m256i (&acc)[P][Q],
                                                       __m256i (&accb)[P][Q]) {
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < Q; ++q) {
      const __m256i s16 = _mm256_maddubs_epi16(accb[p][q], ones8);
      acc[p][q] = _mm256_add_epi32(acc[p][q], _mm256_madd_epi16(s16, ones16));
      accb[p][q] = _mm256_setzero_si256();
    }
}

// Byte-wise popcount through a 16-entry nibble table (pshufb); bytes are summed for at most
// 31 words (31 * 8 < 256) and then widened to 32-bit lanes.
template <int P, int Q>
__attribute__((target("avx2"))) void block_avx2(const Block& b, const Epilogue& e) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                       2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256i acc[P][Q], accb[P][Q];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < Q; ++q) acc[p][q] = accb[p][q] = _mm256_setzero_si256();
  int pending = 0;
  for (int s = 0; s < b.nseg; ++s) {
    const int32_t* xs[P];
    for (int p = 0; p < P; ++p) xs[p] = b.x[p] + b.segs[s].x_off;
    const int32_t* ws = b.w + b.segs[s].w_off * 8;
    const int64_t len = b.segs[s].len;
    for (int64_t c = 0; c < len; ++c) {
      __m256i wv[Q];
      for (int q = 0; q < Q; ++q)
        wv[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + q * b.vstride + c * 8));
      for (int p = 0; p < P; ++p) {
        const __m256i xv = _mm256_set1_epi32(xs[p][c]);
        for (int q = 0; q < Q; ++q) {
          const __m256i t = _mm256_xor_si256(xv, wv[q]);
          const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(t, low4));
          const __m256i hi =
              _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(t, 4), low4));
          accb[p][q] = _mm256_add_epi8(accb[p][q], _mm256_add_epi8(lo, hi));
        }
      }
      if (++pending == 31) {
        avx2_widen<P, Q>(acc, accb);
        pending = 0;
      }
    }
  }
  avx2_widen<P, Q>(acc, accb);
  alignas(32) int32_t counts[P * Q * 8];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < Q; ++q)
      _mm256_store_si256(reinterpret_cast<__m256i*>(counts + (p * Q + q) * 8), acc[p][q]);
  epilogue_scalar(counts, P, Q * 8, b, e);
}

// Scalar: one output channel per "vector" (L = 1), words taken two at a time as 64 bits.
template <int P, int Q>
__attribute__((target("popcnt"))) void block_popcnt(const Block& b, const Epilogue& e) {
  int64_t acc[P][Q] = {};
  for (int s = 0; s < b.nseg; ++s) {
    const int32_t* xs[P];
    for (int p = 0; p < P; ++p) xs[p] = b.x[p] + b.segs[s].x_off;
    const int32_t* ws = b.w + b.segs[s].w_off;
    const int64_t len = b.segs[s].len;
    int64_t c = 0;
    for (; c + 2 <= len; c += 2) {
      uint64_t wv[Q];
      for (int q = 0; q < Q; ++q) std::memcpy(&wv[q], ws + q * b.vstride + c, 8);
      for (int p = 0; p < P; ++p) {
        uint64_t xv;
        std::memcpy(&xv, xs[p] + c, 8);
        for (int q = 0; q < Q; ++q) acc[p][q] += __builtin_popcountll(xv ^ wv[q]);
      }
    }
    if (c < len) {
      for (int p = 0; p < P; ++p) {
        const uint32_t xv = static_cast<uint32_t>(xs[p][c]);
        for (int q = 0; q < Q; ++q)
          acc[p][q] += __builtin_popcount(xv ^ static_cast<uint32_t>(ws[q * b.vstride + c]));
      }
    }
  }
  int32_t counts[P * Q];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < Q; ++q) counts[p * Q + q] = static_cast<int32_t>(acc[p][q]);
  epilogue_scalar(counts, P, Q, b, e);
}

using BlockFn = void (*)(const Block&, const Epilogue&);

template <int P>
BlockFn pick_block(int isa, int q) {
  switch (isa) {
    case ISA_AVX512:
      switch (q) {
        case 1: return block_avx512<P, 1>;
        case 2: return block_avx512<P, 2>;
        case 3: return block_avx512<P, 3>;
        default: return block_avx512<P, 4>;
      }
    case ISA_AVX2:
      switch (q) {
        case 1: return block_avx2<P, 1>;
        case 2: return block_avx2<P, 2>;
        case 3: return block_avx2<P, 3>;
        default: return block_avx2<P, 4>;
      }
    default:
      switch (q) {
        case 1: return block_popcnt<P, 1>;
        case 2: return block_popcnt<P, 2>;
        case 3: return block_popcnt<P, 3>;
        default: return block_popcnt<P, 4>;
      }
  }
}

// ---------------------------------------------------------------------------------------
// Driver: work items are (group, row tile, channel block, output row in the tile), and a
// chunk of work is one tile's rows of one channel block: a thread keeps the block's weights
// hot in L1 while it walks the rows. The tiles go down the map, and parallel_for's threads
// claim chunks from both ends of the range (work_pool.h), so on 2 threads each takes whole
// rows (every channel block) of its own part of the map: in a network, much the rows it
// wrote at the layer before, and no packed output word is written from two cores. (Ordered
// channel block first, thread 0 took channels 0-63 of every pixel and thread 1 channels
// 64-127, and each 16-byte packed pixel of a 128-channel map was written from both cores.)
// ---------------------------------------------------------------------------------------
void conv_driver(const int32_t* x, const int32_t* wrep, const Geometry& g, int isa,
                 const Epilogue& base_epi, int num_threads) {
  const int L = lanes_of(isa);
  const int Qmax = kVectorsPerBlock;
  const int64_t nv = (g.Kg + L - 1) / L;                  // vectors per group
  const int64_t nblocks = (nv + Qmax - 1) / Qmax;         // channel blocks per group
  const int64_t vstride = g.KH * g.KW * g.Wg * L;         // words between vectors
  const int64_t rows = g.N * g.OH;
  const bool contiguous_taps = (g.G == 1 && g.dw == 1);   // a tap row is one run of words
  constexpr int PB = 4;                                   // positions per interior step

  // Output columns whose taps all fall inside the image horizontally.
  int64_t ow_lo = g.OW, ow_hi = g.OW;
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    const int64_t iw0 = ow * g.sw - g.pw, iw1 = iw0 + (g.KW - 1) * g.dw;
    if (iw0 >= 0 && iw1 < g.W) {
      if (ow_lo == g.OW) ow_lo = ow;
      ow_hi = ow + 1;
    }
  }
  // Never split the work finer than the machine: tiny problems run on fewer threads.
  const int64_t work = rows * g.OW * g.K * g.KH * g.KW * g.Wg;
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({num_threads, g.G * nblocks * rows, work / 4096 + 1})));

  // Dynamic chunks, about 8 per thread: a thread that the OS pauses (a shared machine) does
  // not hold up a fixed share of the work; guided, the last ones smaller (on 2 threads, a
  // Bi-Real ResNet-18 forward at 224x224 took 2-3 % less). A tile's last rows past the map
  // are no work.
  const int64_t tile_rows =
      std::clamp<int64_t>(g.G * nblocks * rows / (8 * static_cast<int64_t>(threads)), 1, rows);
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  const int64_t items = g.G * tiles * nblocks * tile_rows;

  bnas::parallel_for(items, tile_rows, threads, [&](int64_t item_begin, int64_t item_end) {
    std::vector<Segment> segs(g.KH * g.KW + 1), bsegs(g.KH * g.KW + 1);
    for (int64_t item = item_begin; item < item_end; ++item) {
      const int64_t tile_block = item / tile_rows;  // (group, tile, block)
      const int64_t row = tile_block / nblocks % tiles * tile_rows + item % tile_rows;
      if (row >= rows) continue;
      const int64_t grp = tile_block / (nblocks * tiles), blk = tile_block % nblocks;
      const int64_t n = row / g.OH, oh = row % g.OH;
      const int64_t v0 = blk * Qmax;
      const int Q = static_cast<int>(std::min<int64_t>(Qmax, nv - v0));

      Block b{};
      b.w = wrep + (grp * nv + v0) * vstride;
      b.vstride = vstride;
      b.k0 = grp * g.Kg + v0 * L;
      b.nch = std::min<int64_t>(static_cast<int64_t>(Q) * L, g.Kg - v0 * L);
      const int64_t kend = b.k0 + b.nch;
      Epilogue e = base_epi;
      e.atomic_bits = e.out_p != nullptr &&
                      ((b.k0 & 31) != 0 || ((kend & 31) != 0 && kend != g.K));

      const int32_t* ximg = x + n * g.H * g.W * g.Ctot + grp * g.Wg;
      // Segments of the valid tap rows for interior columns, relative to the position's
      // first tap column; K_valid counts exactly what is summed.
      int nseg = 0;
      int64_t ni_valid = 0;
      for (int64_t i = 0; i < g.KH; ++i) {
        const int64_t ih = oh * g.sh - g.ph + i * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        ++ni_valid;
        if (contiguous_taps) {
          segs[nseg++] = {ih * g.W * g.Ctot, i * g.KW * g.Wg, g.KW * g.Wg};
        } else {
          for (int64_t j = 0; j < g.KW; ++j)
            segs[nseg++] = {(ih * g.W + j * g.dw) * g.Ctot, (i * g.KW + j) * g.Wg, g.Wg};
        }
      }
      const int64_t kvalid_full = ni_valid * g.KW * g.Cg;
      const int64_t pos_row = row * g.OW;
      const BlockFn block_p = pick_block<PB>(isa, Q);
      const BlockFn block_1 = pick_block<1>(isa, Q);

      // Interior columns, PB at a time (SIMD paths: reuses each weight load PB times; the
      // scalar path has too few registers for PB x Q accumulators), then one at a time.
      b.segs = segs.data();
      b.nseg = nseg;
      int64_t ow = ow_lo;
      for (; isa != ISA_POPCNT && ow + PB <= ow_hi; ow += PB) {
        for (int p = 0; p < PB; ++p) {
          b.x[p] = ximg + ((ow + p) * g.sw - g.pw) * g.Ctot;
          b.pos[p] = pos_row + ow + p;
          b.kvalid[p] = kvalid_full;
        }
        block_p(b, e);
      }
      for (; ow < ow_hi; ++ow) {
        b.x[0] = ximg + (ow * g.sw - g.pw) * g.Ctot;
        b.pos[0] = pos_row + ow;
        b.kvalid[0] = kvalid_full;
        block_1(b, e);
      }
      // Border columns: only the taps inside the image, addressed from the image origin
      // (valid taps of a row are one run of words when taps are adjacent in memory).
      b.segs = bsegs.data();
      for (int64_t owb = 0; owb < g.OW; ++owb) {
        if (owb >= ow_lo && owb < ow_hi) continue;
        int64_t j_lo = g.KW, j_hi = 0;
        for (int64_t j = 0; j < g.KW; ++j) {
          const int64_t iw = owb * g.sw - g.pw + j * g.dw;
          if (iw >= 0 && iw < g.W) {
            j_lo = std::min(j_lo, j);
            j_hi = j + 1;
          }
        }
        const int64_t nj = j_hi > j_lo ? j_hi - j_lo : 0;
        int nb = 0;
        for (int64_t i = 0; i < g.KH && nj > 0; ++i) {
          const int64_t ih = oh * g.sh - g.ph + i * g.dh;
          if (ih < 0 || ih >= g.H) continue;
          const int64_t iw_lo = owb * g.sw - g.pw + j_lo * g.dw;
          if (contiguous_taps) {
            bsegs[nb++] = {(ih * g.W + iw_lo) * g.Ctot, (i * g.KW + j_lo) * g.Wg, nj * g.Wg};
          } else {
            for (int64_t j = j_lo; j < j_hi; ++j)
              bsegs[nb++] = {(ih * g.W + iw_lo + (j - j_lo) * g.dw) * g.Ctot,
                             (i * g.KW + j) * g.Wg, g.Wg};
          }
        }
        const int64_t taps = ni_valid * nj;
        b.nseg = nb;
        b.x[0] = ximg;
        b.pos[0] = pos_row + owb;
        b.kvalid[0] = taps * g.Cg;
        block_1(b, e);
      }
    }
  }, /*guided=*/true);
}

void check_packed(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kInt32, name, " must be int32 packed words");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The kernels rely on zero padding bits (dot = K_valid - 2*popc(x XOR w)); a stray bit past
// Cg in the last word of a group would count as a mismatch.  Checked only when Cg % 32 != 0:
// one read per pixel and group (activations) or per tap and lane (weights), far less than the
// conv's own work.
void check_tail_bits(const int32_t* words, int64_t units, int64_t stride, int64_t offset, int64_t Cg,
                     const char* what) {
  const uint32_t stray = ~((1u << (Cg % 32)) - 1u);
  for (int64_t u = 0; u < units; ++u)
    TORCH_CHECK((static_cast<uint32_t>(words[u * stride + offset]) & stray) == 0, what,
                " have bits set past the ", Cg, " channels of a group (in its last word); padding bits must be 0 "
                "(pack with pack_signs / pack_weights)");
}

// ---------------------------------------------------------------------------------------
// Python entry points
// ---------------------------------------------------------------------------------------

// Weights (K, KH, KW, Wg) -> (G, nv, KH, KW, Wg, L): L output channels interleaved per word,
// channels past Kg in a group zero-filled (their results are never stored). Linear weights
// (K, words) are 1x1 convolution weights.
torch::Tensor repack_weights(const torch::Tensor& wp_in, int64_t groups, int64_t isa) {
  check_packed(wp_in, "packed weights");
  TORCH_CHECK(wp_in.dim() == 4 || wp_in.dim() == 2,
              "packed weights must be (K, kh, kw, words) or (K, words)");
  const torch::Tensor wp =
      wp_in.dim() == 2 ? wp_in.view({wp_in.size(0), 1, 1, wp_in.size(1)}) : wp_in;
  const int64_t K = wp.size(0), KH = wp.size(1), KW = wp.size(2), Wg = wp.size(3);
  TORCH_CHECK(K % groups == 0, "output channels must divide by groups");
  const int64_t L = lanes_of(static_cast<int>(isa));
  const int64_t Kg = K / groups, nv = (Kg + L - 1) / L, T = KH * KW * Wg;
  auto out = torch::zeros({groups, nv, KH, KW, Wg, L}, wp.options());
  const int32_t* src = wp.data_ptr<int32_t>();
  int32_t* dst = out.data_ptr<int32_t>();
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t k = 0; k < Kg; ++k) {
      const int64_t v = k / L, l = k % L;
      const int32_t* s = src + (g * Kg + k) * T;
      int32_t* d = dst + (g * nv + v) * T * L + l;
      for (int64_t t = 0; t < T; ++t) d[t * L] = s[t];
    }
  return out;
}

// Output NHWC: float (N, OH, OW, K) (or viewed as (N, K, OH, OW) channels_last), or packed
// (N, OH, OW, ceil(K / 32)).
// The outputs and the epilogue of a fused binary conv with an (N, K, OH, OW) output: scale,
// bias and residual checked and bound; the float output (channels_last NCHW, or NHWC unless
// `nchw_channels_last`; the residual's own buffer with `into_residual`) and the packed signs
// (zeroed: the epilogue ORs bits in) allocated as asked.
struct FusedOutputs {
  Epilogue e{};
  // the per-channel values as float32 (scale, bias, pack threshold, RPReLU's three), held
  // while the kernel reads them
  std::array<torch::Tensor, 6> channel_values;
  torch::Tensor res, out, packed;  // out: the float output, or the packed one alone
};

// `t`'s `count` values as contiguous float32, kept in `held` while a kernel reads them;
// nullptr without a tensor.
const float* channel_values(const c10::optional<torch::Tensor>& t, int64_t count, const char* what,
                            torch::Tensor& held) {
  if (!t.has_value()) return nullptr;
  held = t->to(torch::kFloat32).contiguous();
  TORCH_CHECK(held.numel() == count, what, " must have one value per channel (", count, "), got ", held.numel());
  return held.data_ptr<float>();
}

FusedOutputs fused_outputs(int64_t N, int64_t OH, int64_t OW, int64_t K, const torch::TensorOptions& int_options,
                           const c10::optional<torch::Tensor>& scale, const c10::optional<torch::Tensor>& bias,
                           const c10::optional<torch::Tensor>& residual, bool float_output, bool pack_output,
                           bool nchw_channels_last, bool into_residual,
                           const c10::optional<torch::Tensor>& pack_threshold,
                           const std::vector<torch::Tensor>& rprelu) {
  FusedOutputs o;
  Epilogue& e = o.e;
  auto& held = o.channel_values;
  e.scale = channel_values(scale, K, "scale", held[0]);
  e.bias = channel_values(bias, K, "bias", held[1]);
  e.pack_threshold = channel_values(pack_threshold, K, "pack_threshold", held[2]);
  TORCH_CHECK(rprelu.empty() || rprelu.size() == 3, "rprelu takes (shift_in, slope, shift_out)");
  if (!rprelu.empty()) {
    e.rprelu_shift_in = channel_values(rprelu[0], K, "rprelu's shift_in", held[3]);
    e.rprelu_slope = channel_values(rprelu[1], K, "rprelu's slope", held[4]);
    e.rprelu_shift_out = channel_values(rprelu[2], K, "rprelu's shift_out", held[5]);
  }
  TORCH_CHECK(float_output || pack_output, "the conv must write a float or a packed output");
  if (residual.has_value()) {
    // NHWC memory: a channels_last (N, K, OH, OW) tensor or an (N, OH, OW, K) one.
    const auto& r = *residual;
    TORCH_CHECK(r.scalar_type() == torch::kFloat32 && r.dim() == 4, "residual must be float32 4-d");
    const bool nhwc = nchw_channels_last
        ? (r.size(0) == N && r.size(1) == K && r.size(2) == OH && r.size(3) == OW &&
           r.is_contiguous(at::MemoryFormat::ChannelsLast))
        : (r.size(0) == N && r.size(1) == OH && r.size(2) == OW && r.size(3) == K && r.is_contiguous());
    TORCH_CHECK(nhwc, "residual must have the output's shape (N, ", K, ", ", OH, ", ", OW,
                ") in NHWC memory, got ", r.sizes());
    o.res = r;
    e.residual = o.res.data_ptr<float>();
  }
  if (pack_output) {
    e.Kw = (K + 31) / 32;
    o.packed = torch::zeros({N, OH, OW, e.Kw}, int_options.dtype(torch::kInt32));
    e.out_p = o.packed.data_ptr<int32_t>();
    o.out = o.packed;
  }
  TORCH_CHECK(!into_residual || (float_output && o.res.defined()),
              "writing into the residual needs a residual and a float output");
  if (into_residual) {
    // each output element is written right after its residual element is read, by the same
    // lane: the shortcut's buffer takes the unit's output (no new tensor, half the traffic)
    o.out = o.res;
    e.out_f = o.out.data_ptr<float>();
  } else if (float_output) {
    if (nchw_channels_last) {
      // (N, K, OH, OW) whose memory is NHWC: what the kernel writes, no permute needed.
      o.out = torch::empty({N, K, OH, OW},
                           int_options.dtype(torch::kFloat32).memory_format(at::MemoryFormat::ChannelsLast));
    } else {
      o.out = torch::empty({N, OH, OW, K}, int_options.dtype(torch::kFloat32));
    }
    e.out_f = o.out.data_ptr<float>();
  }
  e.K = K;
  return o;
}

torch::Tensor conv_nhwc(const torch::Tensor& xp, const torch::Tensor& wrep, int64_t in_channels,
                        int64_t out_channels, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                        int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups,
                        const c10::optional<torch::Tensor>& scale,
                        const c10::optional<torch::Tensor>& bias,
                        const c10::optional<torch::Tensor>& residual, bool float_output,
                        bool pack_output, bool nchw_channels_last, int64_t isa,
                        int64_t num_threads, torch::Tensor* packed_out,
                        bool into_residual,
                        const c10::optional<torch::Tensor>& pack_threshold = c10::nullopt,
                        const std::vector<torch::Tensor>& rprelu = {}) {
  check_packed(xp, "packed input");
  check_packed(wrep, "repacked weights");
  TORCH_CHECK(xp.dim() == 4, "packed input must be (N, H, W, words)");
  TORCH_CHECK(isa_supported(isa), "this CPU does not support the requested instruction set");
  Geometry g{};
  g.N = xp.size(0);
  g.H = xp.size(1);
  g.W = xp.size(2);
  g.G = groups;
  g.Cg = in_channels / groups;
  g.Wg = (g.Cg + 31) / 32;
  g.Ctot = xp.size(3);
  TORCH_CHECK(g.Ctot == g.G * g.Wg, "packed input has ", g.Ctot, " words per pixel, expected ",
              g.G * g.Wg, " for ", in_channels, " channels in ", groups, " groups");
  g.K = out_channels;
  g.Kg = out_channels / groups;
  g.KH = kh; g.KW = kw; g.sh = sh; g.sw = sw; g.ph = ph; g.pw = pw; g.dh = dh; g.dw = dw;
  g.OH = (g.H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  g.OW = (g.W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "the kernel does not fit in the padded input");
  const int64_t L = lanes_of(static_cast<int>(isa));
  TORCH_CHECK(wrep.numel() == g.G * ((g.Kg + L - 1) / L) * kh * kw * g.Wg * L,
              "repacked weights do not match the geometry");
  if (g.Cg % 32 != 0) {
    // activations: word Wg-1 of every (pixel, group); weights (G, nv, KH, KW, Wg, L): word
    // Wg-1 of every (group, vector, tap), all L lanes
    const int32_t* xw = xp.data_ptr<int32_t>();
    for (int64_t gi = 0; gi < g.G; ++gi)
      check_tail_bits(xw, g.N * g.H * g.W, g.Ctot, gi * g.Wg + g.Wg - 1, g.Cg, "packed activations");
    const int64_t taps = g.G * ((g.Kg + L - 1) / L) * kh * kw;
    const int32_t* ww = wrep.data_ptr<int32_t>();
    for (int64_t l = 0; l < L; ++l) check_tail_bits(ww, taps, g.Wg * L, (g.Wg - 1) * L + l, g.Cg, "packed weights");
  }

  FusedOutputs o = fused_outputs(g.N, g.OH, g.OW, g.K, xp.options(), scale, bias, residual, float_output,
                                 pack_output, nchw_channels_last, into_residual, pack_threshold, rprelu);
  Epilogue& e = o.e;
  torch::Tensor& out = o.out;
  torch::Tensor& packed = o.packed;
  conv_driver(xp.data_ptr<int32_t>(), wrep.data_ptr<int32_t>(), g, static_cast<int>(isa), e,
              static_cast<int>(std::max<int64_t>(1, num_threads)));
  if (packed_out != nullptr) *packed_out = packed;
  return out;
}

// Float output as (N, K, OH, OW) in channels_last memory; packed output NHWC.
torch::Tensor conv2d_packed(const torch::Tensor& xp, const torch::Tensor& wrep, int64_t in_channels,
                            int64_t out_channels, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                            int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups,
                            const c10::optional<torch::Tensor>& scale,
                            const c10::optional<torch::Tensor>& bias, bool pack_output,
                            int64_t isa, int64_t num_threads) {
  return conv_nhwc(xp, wrep, in_channels, out_channels, kh, kw, sh, sw, ph, pw, dh, dw, groups,
                   scale, bias, c10::nullopt, !pack_output, pack_output, true, isa, num_threads,
                   nullptr, false);
}

// The fused step of a packed network: conv -> * scale + bias -> + residual (a shortcut) (->
// RPReLU, given its shift_in, slope and shift_out), and the result as float (channels_last
// NCHW), as packed signs for the next binary layer (of y >= pack_threshold per channel when
// given: that layer's sign(y - threshold)), or both.
// Returns [float, packed]; an output not asked for is an undefined tensor (None).
std::vector<torch::Tensor> conv2d_packed_fused(
    const torch::Tensor& xp, const torch::Tensor& wrep, int64_t in_channels, int64_t out_channels,
    int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
    int64_t groups, const c10::optional<torch::Tensor>& scale,
    const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& residual,
    bool float_output, bool pack_output, bool into_residual,
    const c10::optional<torch::Tensor>& pack_threshold, const std::vector<torch::Tensor>& rprelu, int64_t isa,
    int64_t num_threads) {
  torch::Tensor packed;
  torch::Tensor out = conv_nhwc(xp, wrep, in_channels, out_channels, kh, kw, sh, sw, ph, pw, dh,
                                dw, groups, scale, bias, residual, float_output, pack_output, true,
                                isa, num_threads, &packed, into_residual, pack_threshold, rprelu);
  return {float_output ? out : torch::Tensor(), packed};
}

// ---------------------------------------------------------------------------------------
// Grouped binary conv with small groups on a float map: Cg input and Cg output channels per
// group, Cg dividing 16 (a depthwise conv: Cg = 1). Each output channel sums sign(x) * sign(w)
// over its group's channels and taps inside the image, then the fused epilogue. The packed
// path gives each group its own 32-bit word of Cg bits: a 3x3 depthwise conv of DARTS's
// sep_conv at 36x32x32 took 0.53 ms there, and the whole binary network ran no faster than
// its float twin. Here output channels sit in SIMD lanes, straight from the float map: per
// tap and per channel j of a group, each lane takes its group's channel j (a permute within
// the 16 channels of the vector), compares it (the sign as pack_signs takes it: x >= 0) and
// adds its mismatches with the weights' signs under a mask. The sums are the same integers as
// the packed path's (K_valid - 2 * mismatches), and the epilogue is the same, so the outputs
// are equal bit for bit.
// ---------------------------------------------------------------------------------------
struct GroupedGeometry {
  int64_t N, H, W, C, Cg, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW;
};

// The taps of output pixel (oh, ow) inside the image: for each, its input pixel's offset in
// the map (in floats) and its index i * KW + j; returns how many.
inline int64_t inside_taps(const GroupedGeometry& g, int64_t oh, int64_t ow, int64_t* offsets, int64_t* indices) {
  int64_t taps = 0;
  for (int64_t i = 0; i < g.KH; ++i) {
    const int64_t ih = oh * g.sh - g.ph + i * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t j = 0; j < g.KW; ++j) {
      const int64_t iw = ow * g.sw - g.pw + j * g.dw;
      if (iw < 0 || iw >= g.W) continue;
      offsets[taps] = (ih * g.W + iw) * g.C;
      indices[taps++] = i * g.KW + j;
    }
  }
  return taps;
}

// mismatches[k] over `taps` taps (inside_taps) of one output pixel. weight_words: per tap, one
// word per output channel (padded to 16), bit c set where the sign of its weight on its
// group's channel c is +1.
inline void grouped_pixel_generic(const float* img, const int32_t* weight_words, const GroupedGeometry& g,
                                  const int64_t* offsets, const int64_t* indices, int64_t taps, int32_t* mismatches) {
  const int64_t lanes = (g.C + 15) / 16 * 16;
  std::fill(mismatches, mismatches + g.C, 0);
  for (int64_t t = 0; t < taps; ++t) {
    const float* x = img + offsets[t];
    const int32_t* w = weight_words + indices[t] * lanes;
    for (int64_t k = 0; k < g.C; ++k) {
      const float* group = x + (k - k % g.Cg);
      for (int64_t c = 0; c < g.Cg; ++c)
        mismatches[k] += static_cast<int32_t>((group[c] >= 0.0f) != (((w[k] >> c) & 1) != 0));
    }
  }
}

// grouped_pixel_generic in AVX2 lanes, 8 output channels a vector, for groups of 1, 2, 4 or 8
// channels: a tap's 8 signs are one compare; lane k takes its group's signs (the compare's
// movemask shifted right by its group's first lane) and adds the popcount of their XOR with
// its weight bits (a nibble table; at most 8 bits).
__attribute__((target("avx2"))) void grouped_pixel_avx2(const float* img, const int32_t* weight_words,
                                                        const GroupedGeometry& g, const int64_t* offsets,
                                                        const int64_t* indices, int64_t taps, int32_t* mismatches) {
  const int64_t lanes = (g.C + 15) / 16 * 16;  // weight words per tap: 8 from any c0 < C are in bounds
  const __m256 zero = _mm256_setzero_ps();
  const __m256i group_bits = _mm256_set1_epi32(static_cast<int32_t>((1u << g.Cg) - 1u));
  const __m256i nibble = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi32(1), low_byte = _mm256_set1_epi32(0xFF);
  const __m256i counts = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1,
                                          2, 2, 3, 2, 3, 3, 4);
  alignas(32) int32_t first_lane[8], live_lanes[8], sums[8];
  for (int k = 0; k < 8; ++k) first_lane[k] = static_cast<int32_t>(k - k % g.Cg);
  const __m256i shifts = _mm256_load_si256(reinterpret_cast<const __m256i*>(first_lane));
  for (int64_t c0 = 0; c0 < g.C; c0 += 8) {
    const int64_t live = std::min<int64_t>(8, g.C - c0);
    for (int k = 0; k < 8; ++k) live_lanes[k] = k < live ? -1 : 0;
    const __m256i load_mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(live_lanes));
    const int live_bits = (1 << live) - 1;
    __m256i acc = _mm256_setzero_si256();
    for (int64_t t = 0; t < taps; ++t) {
      const __m256 x = _mm256_maskload_ps(img + offsets[t] + c0, load_mask);
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight_words + indices[t] * lanes + c0));
      if (g.Cg == 1) {  // depthwise: a lane's own sign (the compare's lowest bit) against its weight's
        const __m256i own = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, zero, _CMP_GE_OQ)), one);
        acc = _mm256_add_epi32(acc, _mm256_xor_si256(own, w));
        continue;
      }
      const int signs = _mm256_movemask_ps(_mm256_cmp_ps(x, zero, _CMP_GE_OQ)) & live_bits;
      const __m256i own = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(signs), shifts), group_bits);
      const __m256i d = _mm256_xor_si256(own, w);  // at most 8 bits a lane: its low byte
      const __m256i ones = _mm256_add_epi8(_mm256_shuffle_epi8(counts, _mm256_and_si256(d, nibble)),
                                           _mm256_shuffle_epi8(counts, _mm256_and_si256(_mm256_srli_epi32(d, 4), nibble)));
      acc = _mm256_add_epi32(acc, _mm256_and_si256(ones, low_byte));
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums), acc);
    std::copy(sums, sums + live, mismatches + c0);
  }
}

// One output row in AVX-512 lanes, 16 output channels a vector: per pixel, the taps inside
// the image once, then per vector the mismatches and the epilogue of block_avx512, vectorized
// the same way. A tap's 16 signs are one compare. One channel a group (depthwise): lane k's
// mismatch is bit k of (signs XOR the weights' 16-bit mask), added under that mask. Several:
// lane k takes its group's Cg signs (the mask shifted right by its group's first lane), and
// adds the popcount of their XOR with its own Cg weight bits (weight_words: per tap and
// vector, 16 words).
__attribute__((target("avx512f,avx512vpopcntdq"))) void grouped_row_avx512(
    const float* img, const uint16_t* weight_masks, const int32_t* weight_words, const GroupedGeometry& g, int64_t n,
    int64_t oh, const Epilogue& e) {
  const int64_t vectors = (g.C + 15) / 16;
  const __m512 zero = _mm512_setzero_ps();
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i group_bits = _mm512_set1_epi32(static_cast<int32_t>((1u << g.Cg) - 1u));
  alignas(64) int32_t first_lane[16];
  for (int k = 0; k < 16; ++k) first_lane[k] = static_cast<int32_t>(k - k % g.Cg);
  const __m512i shifts = _mm512_load_si512(first_lane);
  std::vector<int64_t> offsets(static_cast<size_t>(g.KH * g.KW)), indices(offsets.size());
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    const int64_t taps = inside_taps(g, oh, ow, offsets.data(), indices.data());
    const int64_t pos = (n * g.OH + oh) * g.OW + ow;
    const __m512i kvalid = _mm512_set1_epi32(static_cast<int32_t>(taps * g.Cg));
    uint64_t bits = 0;
    for (int64_t q = 0; q < vectors; ++q) {
      const int64_t c0 = 16 * q;
      const __mmask16 live = bnas::first_lanes(std::min<int64_t>(16, g.C - c0));
      __m512i acc = _mm512_setzero_si512();
      for (int64_t t = 0; t < taps; ++t) {
        const __m512 x = _mm512_maskz_loadu_ps(live, img + offsets[static_cast<size_t>(t)] + c0);
        const __mmask16 signs = _mm512_mask_cmp_ps_mask(live, x, zero, _CMP_GE_OQ);
        const int64_t at = indices[static_cast<size_t>(t)] * vectors + q;
        if (g.Cg == 1) {
          const __mmask16 differ = static_cast<__mmask16>((signs ^ weight_masks[at]) & live);
          acc = _mm512_mask_add_epi32(acc, differ, acc, one);
        } else {
          const __m512i own = _mm512_and_si512(
              _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int32_t>(signs)), shifts), group_bits);
          const __m512i w = _mm512_load_si512(weight_words + at * 16);
          acc = _mm512_add_epi32(acc, _mm512_popcnt_epi32(_mm512_xor_si512(own, w)));
        }
      }
      const __mmask16 packed = epilogue_avx512(kvalid, acc, e, epilogue_vectors(e, c0, live), pos * e.K + c0);
      if (e.out_p) {
        bits |= static_cast<uint64_t>(packed) << (16 * (q % 4));
        if (q % 4 == 3 || q == vectors - 1) {  // 64 channels' signs, from channel 64 * (q / 4)
          or_bits(e.out_p + pos * e.Kw, 64 * (q / 4), bits, false);
          bits = 0;
        }
      }
    }
  }
}

// masks[i] = bit 0 of the 16 weight words from words + 16 * i: made on every call, so one test
// per vector rather than a loop over every word.
__attribute__((target("avx512f"))) void grouped_masks_avx512(const int32_t* words, int64_t count, uint16_t* masks) {
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < count; ++i) masks[i] = _mm512_test_epi32_mask(_mm512_loadu_si512(words + 16 * i), one);
}

// Float output as (N, C, OH, OW) in channels_last memory; returns [float, packed] as
// conv2d_packed_fused does. weight_words: (KH, KW, C rounded up to 16) int32, bit c of output
// channel k's word set where the sign of its weight on its group's channel c is +1.
std::vector<torch::Tensor> grouped_conv_fused(
    const torch::Tensor& x_in, const torch::Tensor& weight_words, int64_t channels, int64_t channels_per_group,
    int64_t kh, int64_t kw,
    int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, const c10::optional<torch::Tensor>& scale,
    const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& residual, bool float_output,
    bool pack_output, bool into_residual, const c10::optional<torch::Tensor>& pack_threshold,
    const std::vector<torch::Tensor>& rprelu, int64_t isa, int64_t num_threads) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == torch::kFloat32 && x_in.dim() == 4,
              "grouped_conv_fused: input must be a float32 (N, C, H, W) CPU tensor");
  TORCH_CHECK(isa_supported(isa), "this CPU does not support the requested instruction set");
  TORCH_CHECK(x_in.size(1) == channels, "grouped_conv_fused: the conv takes ", channels, " channels, got ",
              x_in.size(1));
  const torch::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t lanes = (channels + 15) / 16 * 16;
  TORCH_CHECK(weight_words.scalar_type() == torch::kInt32 && weight_words.is_contiguous() && weight_words.dim() == 3 &&
                  weight_words.size(0) == kh && weight_words.size(1) == kw && weight_words.size(2) == lanes,
              "grouped_conv_fused: weight words must be contiguous int32 (", kh, ", ", kw, ", ", lanes, ")");
  GroupedGeometry g{x.size(0), x.size(2), x.size(3), x.size(1), channels_per_group, kh, kw, sh, sw, ph, pw, dh, dw,
                    0, 0};
  TORCH_CHECK(g.Cg > 0 && 16 % g.Cg == 0 && g.C % g.Cg == 0,
              "grouped_conv_fused: groups of 1, 2, 4, 8 or 16 channels that divide the ", g.C, ", got ", g.Cg);
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0 && dh > 0 && dw > 0,
              "grouped_conv_fused: bad geometry");
  TORCH_CHECK(g.H + 2 * ph - dh * (kh - 1) - 1 >= 0 && g.W + 2 * pw - dw * (kw - 1) - 1 >= 0,
              "the kernel does not fit in the padded input");
  g.OH = (g.H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  g.OW = (g.W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  FusedOutputs o = fused_outputs(g.N, g.OH, g.OW, g.C, x.options().dtype(torch::kInt32), scale, bias, residual,
                                 float_output, pack_output, true, into_residual, pack_threshold, rprelu);
  const float* src = x.data_ptr<float>();
  const int32_t* words = weight_words.data_ptr<int32_t>();
  const bool avx512 = isa == ISA_AVX512;
  const bool avx2 = isa == ISA_AVX2 && 8 % g.Cg == 0;  // groups within its 8 lanes
  const int64_t vectors = lanes / 16;
  std::vector<uint16_t> masks;  // one channel a group: per tap, the words' bit 0 as one mask per vector
  if (avx512 && g.Cg == 1) {
    masks.resize(static_cast<size_t>(kh * kw * vectors));
    grouped_masks_avx512(words, static_cast<int64_t>(masks.size()), masks.data());
  }
  const int64_t rows = g.N * g.OH;
  const int threads = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({num_threads, rows, rows * g.OW * g.C * g.Cg * kh * kw / 65536 + 1})));
  const Epilogue& e = o.e;
  bnas::parallel_for(rows, std::max<int64_t>(1, rows / (4 * threads)), threads, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> mismatches(static_cast<size_t>(avx512 ? 0 : g.C));
    std::vector<int64_t> offsets(static_cast<size_t>(avx512 ? 0 : kh * kw)), indices(offsets.size());
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.OH, oh = r % g.OH;
      const float* img = src + n * g.H * g.W * g.C;
      if (avx512) {
        grouped_row_avx512(img, masks.data(), words, g, n, oh, e);
        continue;
      }
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        Block b{};
        b.pos[0] = (n * g.OH + oh) * g.OW + ow;
        const int64_t taps = inside_taps(g, oh, ow, offsets.data(), indices.data());
        if (avx2)
          grouped_pixel_avx2(img, words, g, offsets.data(), indices.data(), taps, mismatches.data());
        else
          grouped_pixel_generic(img, words, g, offsets.data(), indices.data(), taps, mismatches.data());
        b.kvalid[0] = taps * g.Cg;
        for (int64_t c0 = 0; c0 < g.C; c0 += 64) {  // the epilogue packs up to 64 bits at a time
          b.k0 = c0;
          b.nch = std::min<int64_t>(64, g.C - c0);
          epilogue_scalar(mismatches.data() + c0, 1, 64, b, e);
        }
      }
    }
  });
  return {float_output ? o.out : torch::Tensor(), o.packed};
}

// Linear = 1x1 convolution over a (1, 1, N) image of N samples.
torch::Tensor linear_packed(const torch::Tensor& xp, const torch::Tensor& wrep,
                            int64_t in_features, int64_t out_features,
                            const c10::optional<torch::Tensor>& scale,
                            const c10::optional<torch::Tensor>& bias, bool pack_output,
                            int64_t isa, int64_t num_threads) {
  TORCH_CHECK(xp.dim() == 2, "packed linear input must be (N, words)");
  const int64_t n = xp.size(0);
  torch::Tensor out = conv_nhwc(xp.view({1, 1, n, xp.size(1)}), wrep, in_features, out_features,
                                1, 1, 1, 1, 0, 0, 1, 1, 1, scale, bias, c10::nullopt,
                                !pack_output, pack_output, false, isa, num_threads, nullptr,
                                false);
  return out.view({n, out.size(3)});
}

// ---------------------------------------------------------------------------------------
// Packing signs of a float NCHW tensor into NHWC words (bit 1 where x >= 0, or x >= t[c] with
// a threshold per channel: sign(x - t), since without flush-to-zero x - t >= 0 exactly when
// x >= t). A task is one image and a run of pixels; every word of those pixels is built, then
// written out in NHWC order as one contiguous stretch.
// ---------------------------------------------------------------------------------------
struct PackGeometry {
  int64_t C, HW, Cg, Wg, Ctot;
};

// Generic: 32 channels at a time, bits gathered per pixel (the compiler vectorizes the
// pixel loop).
void pack_pixels_generic(const float* img, const PackGeometry& g, int64_t p0, int64_t np,
                         uint32_t* out, const float* threshold) {
  for (int64_t word = 0; word < g.Ctot; ++word) {
    const int64_t grp = word / g.Wg, wi = word % g.Wg;
    const int64_t c0 = grp * g.Cg + wi * 32;
    const int64_t nch = std::min<int64_t>(32, g.Cg - wi * 32);
    uint32_t bits[64] = {};
    for (int64_t j = 0; j < nch; ++j) {
      const float* r = img + (c0 + j) * g.HW + p0;
      const uint32_t bit = 1u << j;
      const float t = threshold ? threshold[c0 + j] : 0.0f;
      for (int64_t p = 0; p < np; ++p) bits[p] |= (r[p] >= t) ? bit : 0u;
    }
    for (int64_t p = 0; p < np; ++p) out[(p0 + p) * g.Ctot + word] = bits[p];
  }
}

// AVX-512: 16 pixels per register, up to 4 registers (64 pixels) per channel so every
// channel is read as one contiguous run; a channel's signs become one compare mask that
// sets bit j in those pixels' words.
__attribute__((target("avx512f,avx512bw"))) void pack_pixels_avx512(const float* img,
                                                                    const PackGeometry& g,
                                                                    int64_t p0, int64_t np,
                                                                    uint32_t* out,
                                                                    const float* threshold) {
  __mmask16 live[4];
  for (int b = 0; b < 4; ++b) {
    const int64_t n16 = std::max<int64_t>(0, std::min<int64_t>(16, np - 16 * b));
    live[b] = bnas::first_lanes(n16);
  }
  const __m512 zero = _mm512_setzero_ps();
  alignas(64) uint32_t words[64];
  for (int64_t word = 0; word < g.Ctot; ++word) {
    const int64_t grp = word / g.Wg, wi = word % g.Wg;
    const int64_t c0 = grp * g.Cg + wi * 32;
    const int64_t nch = std::min<int64_t>(32, g.Cg - wi * 32);
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                      _mm512_setzero_si512()};
    const float* r = img + c0 * g.HW + p0;
    for (int64_t j = 0; j < nch; ++j, r += g.HW) {
      const __m512i bit = _mm512_set1_epi32(static_cast<int>(1u << j));
      const __m512 t = threshold ? _mm512_set1_ps(threshold[c0 + j]) : zero;
      for (int b = 0; b < 4; ++b) {
        const __m512 v = _mm512_maskz_loadu_ps(live[b], r + 16 * b);
        const __mmask16 ge = _mm512_mask_cmp_ps_mask(live[b], v, t, _CMP_GE_OQ);
        acc[b] = _mm512_mask_or_epi32(acc[b], ge, acc[b], bit);
      }
    }
    if (g.Ctot == 1) {
      for (int b = 0; b < 4; ++b) _mm512_mask_storeu_epi32(out + p0 + 16 * b, live[b], acc[b]);
    } else {
      for (int b = 0; b < 4; ++b) _mm512_store_si512(words + 16 * b, acc[b]);
      for (int64_t i = 0; i < np; ++i) out[(p0 + i) * g.Ctot + word] = words[i];
    }
  }
}

// Rows of contiguous features (linear layers): 32 neighbouring floats make one word; with a
// threshold, feature j's bit is x[j] >= threshold[j].
void pack_row_generic(const float* x, int64_t F, uint32_t* out, const float* threshold) {
  for (int64_t w = 0; w * 32 < F; ++w) {
    const int64_t nch = std::min<int64_t>(32, F - w * 32);
    uint32_t bits = 0;
    for (int64_t j = 0; j < nch; ++j) {
      const int64_t i = w * 32 + j;
      bits |= (x[i] >= (threshold ? threshold[i] : 0.0f)) ? (1u << j) : 0u;
    }
    out[w] = bits;
  }
}

__attribute__((target("avx512f,avx512bw"))) void pack_row_avx512(const float* x, int64_t F,
                                                                 uint32_t* out, const float* threshold) {
  for (int64_t w = 0; w * 32 < F; ++w) {
    const int64_t nch = std::min<int64_t>(32, F - w * 32);
    const int64_t lo = std::min<int64_t>(16, nch), hi = nch - lo;
    const __mmask16 mlo = bnas::first_lanes(lo);
    const __mmask16 mhi = bnas::first_lanes(hi);
    const __m512 tlo = threshold ? _mm512_maskz_loadu_ps(mlo, threshold + w * 32) : _mm512_setzero_ps();
    const __m512 thi = threshold ? _mm512_maskz_loadu_ps(mhi, threshold + w * 32 + 16) : _mm512_setzero_ps();
    const uint32_t blo = _mm512_mask_cmp_ps_mask(mlo, _mm512_maskz_loadu_ps(mlo, x + w * 32),
                                                 tlo, _CMP_GE_OQ);
    const uint32_t bhi = _mm512_mask_cmp_ps_mask(
        mhi, _mm512_maskz_loadu_ps(mhi, x + w * 32 + 16), thi, _CMP_GE_OQ);
    out[w] = blo | (bhi << 16);
  }
}

// Rows of f contiguous floats -> rows of ceil(f / 32) words, rows split among threads. With a
// threshold, row i compares with its f values from threshold + (i % threshold_rows) * f (the
// rows of a channels_last map cycle through its groups).
void pack_rows(const float* src, int64_t n, int64_t f, uint32_t* dst, bool avx512,
               int64_t num_threads, const float* threshold = nullptr, int64_t threshold_rows = 1) {
  const int64_t words = (f + 31) / 32;
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({num_threads, n, n * f / 32768 + 1})));
  bnas::parallel_for(n, n / (4 * threads), threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* t = threshold ? threshold + (i % threshold_rows) * f : nullptr;
      if (avx512)
        pack_row_avx512(src + i * f, f, dst + i * words, t);
      else
        pack_row_generic(src + i * f, f, dst + i * words, t);
    }
  });
}

// `threshold`: one value per channel (feature) or none; a bit is then x >= threshold.
torch::Tensor pack_signs(const torch::Tensor& x_in, int64_t groups, int64_t isa,
                         int64_t num_threads, const c10::optional<torch::Tensor>& threshold = c10::nullopt) {
  TORCH_CHECK(x_in.device().is_cpu(), "pack_signs: input must be on the CPU");
  TORCH_CHECK(x_in.dim() == 4 || x_in.dim() == 2, "pack_signs: input must be NCHW or (N, F)");
  const bool avx512 = isa == ISA_AVX512 && isa_supported(ISA_AVX512);
  TORCH_CHECK(!threshold.has_value() || threshold->device().is_cpu(), "pack_signs: the threshold must be on the CPU");
  torch::Tensor held;
  const float* thresholds = channel_values(threshold, x_in.size(1), "pack_signs: the threshold", held);
  if (x_in.dim() == 2) {
    auto x = x_in.to(torch::kFloat32).contiguous();
    const int64_t n = x.size(0), f = x.size(1), words = (f + 31) / 32;
    auto out = torch::empty({n, words}, x.options().dtype(torch::kInt32));
    pack_rows(x.data_ptr<float>(), n, f, reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()),
              avx512, num_threads, thresholds);
    return out;
  }
  TORCH_CHECK(x_in.size(1) % groups == 0, "channels must divide by groups");
  // channels_last float32 (the packed networks' float glue): each pixel's channels of one
  // group are a row of contiguous floats, packed in place of a copy to NCHW.
  if (x_in.scalar_type() == torch::kFloat32 && !x_in.is_contiguous() &&
      x_in.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    const int64_t N = x_in.size(0), Cg = x_in.size(1) / groups, H = x_in.size(2), W = x_in.size(3);
    auto out = torch::empty({N, H, W, groups * ((Cg + 31) / 32)}, x_in.options().dtype(torch::kInt32));
    pack_rows(x_in.data_ptr<float>(), N * H * W * groups, Cg,
              reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), avx512, num_threads, thresholds, groups);
    return out;
  }
  auto x = x_in.to(torch::kFloat32).contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  PackGeometry g{C, H * W, C / groups, (C / groups + 31) / 32, 0};
  g.Ctot = groups * g.Wg;
  auto out = torch::empty({N, H, W, g.Ctot}, x.options().dtype(torch::kInt32));
  const float* src = x.data_ptr<float>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  constexpr int64_t kPixelsPerTask = 64;
  const int64_t blocks = (g.HW + kPixelsPerTask - 1) / kPixelsPerTask;
  const int64_t tasks = N * blocks;
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({num_threads, tasks, N * C * g.HW / 32768 + 1})));
  bnas::parallel_for(tasks, tasks / (4 * threads), threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, p0 = (t % blocks) * kPixelsPerTask;
      const int64_t np = std::min<int64_t>(kPixelsPerTask, g.HW - p0);
      const float* img = src + n * C * g.HW;
      uint32_t* o = dst + n * g.HW * g.Ctot;
      if (avx512)
        pack_pixels_avx512(img, g, p0, np, o, thresholds);
      else
        pack_pixels_generic(img, g, p0, np, o, thresholds);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Real input x 1-bit weights (a binary network's first layer: real pixels, weights +-alpha):
// out[n, k] = (sum_i (w[k, i] ? x[n, i] : -x[n, i])) * scale[k] + bias[k]. The weights stay
// packed (32x smaller than float), so a batch-1 call reads 1/32 of a float GEMV's bytes.
// ---------------------------------------------------------------------------------------

// Packed (K, words) weights -> (ceil(K / 16), F) 16-bit masks: bit l of mask (v, i) is the
// sign bit of channel 16 v + l at feature i (channels past K are 0 and never stored).
torch::Tensor repack_real_weights(const torch::Tensor& wp, int64_t in_features) {
  check_packed(wp, "packed weights");
  TORCH_CHECK(wp.dim() == 2 && wp.size(1) == (in_features + 31) / 32,
              "packed weights must be (K, ceil(in_features / 32))");
  const int64_t K = wp.size(0), words = wp.size(1), nv = (K + 15) / 16;
  auto out = torch::zeros({nv, in_features}, wp.options().dtype(torch::kInt16));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(wp.data_ptr<int32_t>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>());
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < in_features; ++i)
      if ((src[k * words + i / 32] >> (i % 32)) & 1u)
        dst[(k / 16) * in_features + i] |= static_cast<uint16_t>(1u << (k % 16));
  return out;
}

__attribute__((target("avx512f"))) void real_binary_rows_avx512(
    const float* x, const uint16_t* masks, int64_t F, int64_t K, const float* scale,
    const float* bias, float* out) {
  const int64_t nv = (K + 15) / 16;
  constexpr int V = 4;  // vectors per step: each broadcast input feeds 4 x 16 channels
  for (int64_t v0 = 0; v0 < nv; v0 += V) {
    const int nvec = static_cast<int>(std::min<int64_t>(V, nv - v0));
    __m512 acc[V];
    for (int q = 0; q < V; ++q) acc[q] = _mm512_setzero_ps();
    for (int64_t i = 0; i < F; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i]);
      const __m512 nx = _mm512_sub_ps(_mm512_setzero_ps(), xv);
      for (int q = 0; q < nvec; ++q) {
        const __mmask16 m = masks[(v0 + q) * F + i];
        acc[q] = _mm512_add_ps(acc[q], _mm512_mask_blend_ps(m, nx, xv));
      }
    }
    for (int q = 0; q < nvec; ++q) {
      const int64_t k = (v0 + q) * 16, nl = std::min<int64_t>(16, K - k);
      const __mmask16 lanes = bnas::first_lanes(nl);
      __m512 v = acc[q];
      if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(lanes, scale + k));
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, bias + k));
      _mm512_mask_storeu_ps(out + k, lanes, v);
    }
  }
}

void real_binary_rows_generic(const float* x, const uint16_t* masks, int64_t F, int64_t K,
                              const float* scale, const float* bias, float* out) {
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* m = masks + (k / 16) * F;
    const uint16_t bit = static_cast<uint16_t>(1u << (k % 16));
    float acc = 0.0f;
    for (int64_t i = 0; i < F; ++i) acc += (m[i] & bit) ? x[i] : -x[i];
    float v = acc;
    if (scale) v = v * scale[k];
    if (bias) v = v + bias[k];
    out[k] = v;
  }
}

torch::Tensor real_binary_linear(const torch::Tensor& x_in, const torch::Tensor& masks,
                                 int64_t out_features, const c10::optional<torch::Tensor>& scale,
                                 const c10::optional<torch::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2, "input must be a CPU (N, F) tensor");
  const auto x = x_in.to(torch::kFloat32).contiguous();
  const int64_t N = x.size(0), F = x.size(1), K = out_features;
  TORCH_CHECK(masks.scalar_type() == torch::kInt16 && masks.is_contiguous() &&
                  masks.dim() == 2 && masks.size(0) == (K + 15) / 16 && masks.size(1) == F,
              "weight masks do not match ", F, " features and ", K, " outputs");
  torch::Tensor sc, bi;
  if (scale.has_value()) sc = scale->to(torch::kFloat32).contiguous();
  if (bias.has_value()) bi = bias->to(torch::kFloat32).contiguous();
  TORCH_CHECK(!sc.defined() || sc.numel() == K, "scale must have one value per output");
  TORCH_CHECK(!bi.defined() || bi.numel() == K, "bias must have one value per output");
  auto out = torch::empty({N, K}, x.options());
  const bool avx512 = isa == ISA_AVX512 && isa_supported(ISA_AVX512);
  const uint16_t* m = reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>());
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x.data_ptr<float>() + n * F;
    float* o = out.data_ptr<float>() + n * K;
    const float* s = sc.defined() ? sc.data_ptr<float>() : nullptr;
    const float* b = bi.defined() ? bi.data_ptr<float>() : nullptr;
    if (avx512)
      real_binary_rows_avx512(xr, m, F, K, s, b, o);
    else
      real_binary_rows_generic(xr, m, F, K, s, b, o);
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Max-pool on channels_last float maps (the float stem's 3x3/2 pool): every input byte is read
// from memory once, channels in SIMD lanes. Padding never wins (as in PyTorch); NaN inputs
// are not propagated (inference inputs are finite).
// ---------------------------------------------------------------------------------------
struct PoolGeometry {
  int64_t C, H, W, OH, OW, kh, kw, sh, sw, ph, pw;
};

void max_pool_row_generic(const float* img, float* out, uint32_t* packed, const PoolGeometry& g,
                          int64_t oh) {
  const int64_t ih0 = std::max<int64_t>(0, oh * g.sh - g.ph);
  const int64_t ih1 = std::min<int64_t>(g.H, oh * g.sh - g.ph + g.kh);
  const int64_t words = (g.C + 31) / 32;
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    const int64_t iw0 = std::max<int64_t>(0, ow * g.sw - g.pw);
    const int64_t iw1 = std::min<int64_t>(g.W, ow * g.sw - g.pw + g.kw);
    float* o = out + (oh * g.OW + ow) * g.C;
    std::fill(o, o + g.C, -INFINITY);
    for (int64_t ih = ih0; ih < ih1; ++ih)
      for (int64_t iw = iw0; iw < iw1; ++iw) {
        const float* x = img + (ih * g.W + iw) * g.C;
        for (int64_t c = 0; c < g.C; ++c) o[c] = std::max(o[c], x[c]);
      }
    if (packed) {
      uint32_t* pw = packed + (oh * g.OW + ow) * words;
      std::fill(pw, pw + words, 0u);
      for (int64_t c = 0; c < g.C; ++c) pw[c / 32] |= (o[c] >= 0.0f ? 1u : 0u) << (c % 32);
    }
  }
}

// Returns (pooled map, its packed signs); the second is undefined (None) unless pack_output.
std::tuple<torch::Tensor, torch::Tensor> max_pool2d_nhwc(const torch::Tensor& x, int64_t kh,
                                                         int64_t kw, int64_t sh, int64_t sw,
                                                         int64_t ph, int64_t pw, int64_t isa,
                                                         int64_t num_threads, bool pack_output) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "max_pool2d_nhwc: input must be a channels_last float32 CPU tensor");
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0 && 2 * ph <= kh &&
                  2 * pw <= kw,
              "max_pool2d_nhwc: padding must be at most half the kernel");
  const int64_t N = x.size(0);
  PoolGeometry g{x.size(1), x.size(2), x.size(3), 0, 0, kh, kw, sh, sw, ph, pw};
  g.OH = (g.H + 2 * ph - kh) / sh + 1;
  g.OW = (g.W + 2 * pw - kw) / sw + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "max_pool2d_nhwc: the kernel does not fit in the padded input");
  auto out = torch::empty({N, g.C, g.OH, g.OW},
                          x.options().memory_format(at::MemoryFormat::ChannelsLast));
  torch::Tensor packed;
  if (pack_output)
    packed = torch::empty({N, g.OH, g.OW, (g.C + 31) / 32}, x.options().dtype(torch::kInt32));
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  uint32_t* pdst = pack_output ? reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()) : nullptr;
  const int64_t words = (g.C + 31) / 32;
  const bool avx512 = isa == ISA_AVX512 && isa_supported(ISA_AVX512);
  const int64_t rows = N * g.OH;
  const int threads = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({num_threads, rows, rows * g.OW * g.C / 65536 + 1})));
  bnas::parallel_for(rows, std::max<int64_t>(1, rows / (4 * threads)), threads,
                     [&](int64_t begin, int64_t end) {
                       std::vector<const float*> rows_in(static_cast<size_t>(g.kh));
                       for (int64_t r = begin; r < end; ++r) {
                         const int64_t n = r / g.OH, oh = r % g.OH;
                         const float* img = src + n * g.H * g.W * g.C;
                         float* o = dst + n * g.OH * g.OW * g.C;
                         uint32_t* p = pdst ? pdst + n * g.OH * g.OW * words : nullptr;
                         if (avx512) {
                           const int64_t ih0 = std::max<int64_t>(0, oh * g.sh - g.ph);
                           const int64_t ih1 = std::min<int64_t>(g.H, oh * g.sh - g.ph + g.kh);
                           for (int64_t ih = ih0; ih < ih1; ++ih) rows_in[ih - ih0] = img + ih * g.W * g.C;
                           bnas::max_pool_row_avx512(rows_in.data(), ih1 - ih0, g.W, g.C, g.OW, g.kw, g.sw, g.pw,
                                                     o + oh * g.OW * g.C,
                                                     p ? p + oh * g.OW * words : nullptr);
                         } else
                           max_pool_row_generic(img, o, p, g, oh);
                       }
                     });
  return {out, packed};
}

// ---------------------------------------------------------------------------------------
// Global average pool of a channels_last float map: (N, C, H, W) -> (N, C), each channel's
// values summed over the pixels in order (p = 0 .. H*W-1; the loop over channels vectorizes),
// then divided by H*W. A classifier's input: run by PyTorch, this 25 K-value mean cost more
// than the whole 512 -> 1000 head in a Bi-Real ResNet-18 forward (its reduction code has left
// the caches by then). Images are split among the threads; a channel's sum never is, so the
// result does not depend on the thread count.
// ---------------------------------------------------------------------------------------
torch::Tensor global_avg_pool_nhwc(const torch::Tensor& x, int64_t num_threads) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "global_avg_pool_nhwc: input must be a channels_last float32 CPU tensor");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(HW > 0, "global_avg_pool_nhwc: the map has no pixels");
  auto out = torch::empty({N, C}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float pixels = static_cast<float>(HW);
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({num_threads, N, N * HW * C / 262144 + 1})));
  bnas::parallel_for(N, 1, threads, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* o = dst + n * C;
      std::fill(o, o + C, 0.0f);
      const float* img = src + n * HW * C;
      for (int64_t p = 0; p < HW; ++p)
        for (int64_t c = 0; c < C; ++c) o[c] += img[p * C + c];
      for (int64_t c = 0; c < C; ++c) o[c] /= pixels;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// 1x1 float conv of a channels_last map, on its 2x2/2 average pool (floor or ceil mode, no
// padding) with pool == 2: a binary network's float downsample shortcut (pointwise_conv.h).
// AVX-512 only: the caller runs PyTorch's ops on other CPUs.
// ---------------------------------------------------------------------------------------
// The geometry of a pointwise call on channels_last float32 `x` (checked; `what` names the
// function in errors), and its output, channels_last (N, K, OH, OW).
bnas::PointwiseGeometry pointwise_geometry(const char* what, const torch::Tensor& x, int64_t out_channels,
                                           int64_t pool, bool ceil_mode, int64_t stride) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              what, ": input must be a channels_last float32 CPU tensor");
  TORCH_CHECK(pool == 1 || pool == 2, what, ": pool must be 1 or 2");
  TORCH_CHECK(stride >= 1 && (pool == 1 || stride == 1), what, ": a stride >= 1, and 1 after a pool");
  bnas::PointwiseGeometry g{x.size(0), x.size(2), x.size(3), x.size(1), 0, 0, out_channels,
                            (out_channels + 15) / 16 * 16, pool, pool == 2 && ceil_mode, stride};
  g.OH = pool == 2 ? (g.H + (g.ceil ? 1 : 0)) / 2 : (g.H - 1) / stride + 1;
  g.OW = pool == 2 ? (g.W + (g.ceil ? 1 : 0)) / 2 : (g.W - 1) / stride + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, what, ": the pool does not fit in the input");
  return g;
}

// The bias as contiguous float32 (undefined without one), checked: one value per output.
torch::Tensor output_bias(const c10::optional<torch::Tensor>& bias, int64_t out_channels) {
  torch::Tensor bi;
  if (bias.has_value()) bi = bias->to(torch::kFloat32).contiguous();
  TORCH_CHECK(!bi.defined() || bi.numel() == out_channels, "bias must have one value per output");
  return bi;
}

torch::Tensor pointwise_conv_nhwc(const torch::Tensor& x, const torch::Tensor& wt,
                                  int64_t out_channels, const c10::optional<torch::Tensor>& bias,
                                  int64_t pool, bool ceil_mode, int64_t stride,
                                  int64_t num_threads) {
  TORCH_CHECK(isa_supported(ISA_AVX512), "pointwise_conv_nhwc: this CPU has no AVX-512");
  const bnas::PointwiseGeometry g = pointwise_geometry("pointwise_conv_nhwc", x, out_channels, pool, ceil_mode, stride);
  TORCH_CHECK(wt.scalar_type() == torch::kFloat32 && wt.is_contiguous() && wt.dim() == 2 &&
                  wt.size(0) == g.C && wt.size(1) == g.Kp,
              "pointwise_conv_nhwc: weights must be (", g.C, ", ", g.Kp, ") float32, got ",
              wt.sizes());
  const torch::Tensor bi = output_bias(bias, out_channels);
  auto out = torch::empty({g.N, out_channels, g.OH, g.OW},
                          x.options().memory_format(at::MemoryFormat::ChannelsLast));
  bnas::pointwise_conv_avx512(x.data_ptr<float>(), wt.data_ptr<float>(),
                              bi.defined() ? bi.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                              g, static_cast<int>(num_threads));
  return out;
}

// The same shortcut in 8-bit integers (pointwise_conv.h): weights as the int8 image conv's,
// (1, ceil(C / 4), Kp, 4) int8 with float32 scales and int32 sums per output channel. AVX-512
// VNNI only: `int8_supported` says.
bool int8_supported();

torch::Tensor int8_pointwise_conv_nhwc(const torch::Tensor& x, const torch::Tensor& weights,
                                       const torch::Tensor& w_scale, const torch::Tensor& w_sum,
                                       int64_t out_channels, const c10::optional<torch::Tensor>& bias,
                                       int64_t pool, bool ceil_mode, int64_t stride, int64_t num_threads) {
  TORCH_CHECK(int8_supported(), "int8_pointwise_conv_nhwc: this CPU has no AVX-512 VNNI");
  const bnas::PointwiseGeometry g =
      pointwise_geometry("int8_pointwise_conv_nhwc", x, out_channels, pool, ceil_mode, stride);
  TORCH_CHECK(g.C <= 518, "int8_pointwise_conv_nhwc: at most 518 input channels (exact int32 sums)");
  TORCH_CHECK(weights.scalar_type() == torch::kInt8 && weights.is_contiguous() &&
                  weights.numel() == (g.C + 3) / 4 * g.Kp * 4,
              "int8_pointwise_conv_nhwc: weights must be (1, ", (g.C + 3) / 4, ", ", g.Kp, ", 4) int8");
  TORCH_CHECK(w_scale.scalar_type() == torch::kFloat32 && w_scale.numel() == out_channels &&
                  w_sum.scalar_type() == torch::kInt32 && w_sum.numel() == out_channels,
              "int8_pointwise_conv_nhwc: float32 scales and int32 sums, one per output");
  const torch::Tensor bi = output_bias(bias, out_channels);
  auto out = torch::empty({g.N, out_channels, g.OH, g.OW},
                          x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const torch::Tensor scale_c = w_scale.contiguous(), sum_c = w_sum.contiguous();
  bnas::int8_pointwise_conv_avx512(x.data_ptr<float>(), weights.data_ptr<int8_t>(), scale_c.data_ptr<float>(),
                                   sum_c.data_ptr<int32_t>(), bi.defined() ? bi.data_ptr<float>() : nullptr,
                                   out.data_ptr<float>(), g, static_cast<int>(num_threads));
  return out;
}

// ---------------------------------------------------------------------------------------
// A float linear layer on few input rows (linear_rows.h): a classifier at small batch.
// ---------------------------------------------------------------------------------------
torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& w,
                          const c10::optional<torch::Tensor>& bias, int64_t num_threads) {
  TORCH_CHECK(isa_supported(ISA_AVX512), "linear_rows: this CPU has no AVX-512");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2,
              "linear_rows: input must be a 2-d float32 CPU tensor");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kFloat32 && w.dim() == 2 &&
                  w.size(1) == x.size(1),
              "linear_rows: weights must be (K, ", x.size(1), ") float32, got ", w.sizes());
  const torch::Tensor xc = x.contiguous(), wc = w.contiguous();
  const torch::Tensor bi = output_bias(bias, w.size(0));
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  if (out.numel() == 0) return out;
  if (x.size(1) == 0) return bi.defined() ? out.copy_(bi.expand_as(out)) : out.zero_();
  bnas::linear_rows_avx512(xc.data_ptr<float>(), wc.data_ptr<float>(),
                           bi.defined() ? bi.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                           x.size(0), x.size(1), w.size(0), static_cast<int>(num_threads));
  return out;
}

// ---------------------------------------------------------------------------------------
// A float conv on the image (stem_conv.h), in float32 or (weights given as int8) in 8-bit
// integers, alone or with the max-pool after it. Weights come in the kernel's layout from
// Python: float32 (kh, kw * C, Kp), or int8 (kh, quads, Kp, 4) with float32 scales and int32
// sums per output channel. Returns (output channels_last, its packed NHWC signs or undefined).
// AVX-512 only, and VNNI for int8: `int8_supported` says.
// ---------------------------------------------------------------------------------------
bool int8_supported() {
  __builtin_cpu_init();
  return isa_supported(ISA_AVX512) && __builtin_cpu_supports("avx512vnni");
}

std::tuple<torch::Tensor, torch::Tensor> image_conv_nhwc(
    const torch::Tensor& x, const torch::Tensor& weights, const c10::optional<torch::Tensor>& w_scale,
    const c10::optional<torch::Tensor>& w_sum, const c10::optional<torch::Tensor>& bias,
    int64_t out_channels, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
    int64_t pool_kh, int64_t pool_kw, int64_t pool_sh, int64_t pool_sw, int64_t pool_ph,
    int64_t pool_pw, bool pack_output, double grid_scale, int64_t grid_zero_point, int64_t num_threads) {
  const bool int8 = weights.scalar_type() == torch::kInt8;
  TORCH_CHECK(int8 ? int8_supported() : isa_supported(ISA_AVX512),
              "image_conv_nhwc: this CPU has no AVX-512", int8 ? " VNNI" : "");
  TORCH_CHECK(grid_scale <= 0.0 || (int8 && grid_zero_point >= 0 && grid_zero_point <= 255),
              "image_conv_nhwc: a pixel grid (scale > 0) is for int8 weights, with a zero point in [0, 255]");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 4,
              "image_conv_nhwc: input must be a 4-d float32 CPU tensor");
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const torch::Tensor xc = channels_last ? x : x.contiguous();
  bnas::ImageConvGeometry g{};
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.K = out_channels, g.kh = kh, g.kw = kw, g.sh = sh, g.sw = sw, g.ph = ph, g.pw = pw;
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0,
              "image_conv_nhwc: bad kernel, stride or padding");
  g.Hp = g.H + 2 * ph, g.Wp = g.W + 2 * pw;
  TORCH_CHECK(g.Hp >= kh && g.Wp >= kw, "image_conv_nhwc: the kernel does not fit in the padded input");
  g.OH = (g.Hp - kh) / sh + 1, g.OW = (g.Wp - kw) / sw + 1;
  g.quads = (kw * g.C + 3) / 4;
  g.Kp = (out_channels + 15) / 16 * 16;
  TORCH_CHECK(weights.is_contiguous() &&
                  (int8 ? weights.numel() == kh * g.quads * g.Kp * 4
                        : weights.scalar_type() == torch::kFloat32 && weights.numel() == kh * kw * g.C * g.Kp),
              "image_conv_nhwc: weights must be (", kh, ", ", g.quads, ", ", g.Kp, ", 4) int8 or (", kh,
              ", ", kw * g.C, ", ", g.Kp, ") float32");
  const torch::Tensor bi = output_bias(bias, out_channels);
  const bool pooled = pool_kh > 0;
  bnas::PoolAfterConv pg{pool_kh, pool_kw, pool_sh, pool_sw, pool_ph, pool_pw, g.OH, g.OW};
  if (pooled) {
    TORCH_CHECK(pool_kw >= 1 && pool_sh >= 1 && pool_sw >= 1 && pool_ph >= 0 && pool_pw >= 0 &&
                    2 * pool_ph <= pool_kh && 2 * pool_pw <= pool_kw,
                "image_conv_nhwc: a pool kernel and stride >= 1, padding at most half the kernel");
    TORCH_CHECK(g.OH + 2 * pool_ph >= pool_kh && g.OW + 2 * pool_pw >= pool_kw,
                "image_conv_nhwc: the pool does not fit in the conv's output");
    pg.OH = (g.OH + 2 * pool_ph - pool_kh) / pool_sh + 1;
    pg.OW = (g.OW + 2 * pool_pw - pool_kw) / pool_sw + 1;
  }
  TORCH_CHECK(pooled || !pack_output, "image_conv_nhwc: packed signs come with a pool only");
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  const float* xs = xc.data_ptr<float>();
  const int64_t image_floats = g.C * g.H * g.W, image_values = g.Hp * g.Wp * g.C;
  // The padded image is written row by row on the threads, its border with the rows (a
  // serial fill of the whole 635 KB buffer first cost ~30 us of the 224x224 stem).
  const int64_t rows_to_pad = g.N * g.Hp;
  const int pad_threads = g.N * image_floats >= 65536 ? threads : 1;
  const int64_t pad_chunk = std::max<int64_t>(1, rows_to_pad / (4 * threads));
  const int64_t row_values = g.Wp * g.C, border_values = pw * g.C, inner_values = g.W * g.C;
  // Padded row i (image i / Hp, row i % Hp): its image row's index, or -1 for a padding row.
  const auto image_row = [&](int64_t i) -> int64_t {
    const int64_t r = i % g.Hp - ph;
    return r >= 0 && r < g.H ? r : -1;
  };

  auto out = torch::empty({g.N, out_channels, pg.OH, pg.OW},
                          x.options().memory_format(at::MemoryFormat::ChannelsLast));
  torch::Tensor packed;
  if (pack_output)
    packed = torch::empty({g.N, pg.OH, pg.OW, (out_channels + 31) / 32}, x.options().dtype(torch::kInt32));
  float* o = out.data_ptr<float>();
  uint32_t* pk = pack_output ? reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()) : nullptr;
  const float* b = bi.defined() ? bi.data_ptr<float>() : nullptr;
  const auto float_pool_row = [&](int64_t, const float* const* rows, int64_t count, float* out_row, uint32_t* packed_row) {
    bnas::max_pool_row_avx512(rows, count, g.OW, g.K, pg.OW, pg.kw, pg.sw, pg.pw, out_row, packed_row);
  };
  auto run = [&](const auto& conv_row) {
    if (pooled)
      bnas::conv_max_pool_rows(g, pg, threads, o, pk, conv_row, float_pool_row);
    else
      bnas::conv_rows(g, threads, o, conv_row);
  };

  if (!int8) {
    // the padded float image (N, Hp, Wp, C): zeros around, the image's values inside
    auto padded = torch::empty({g.N * image_values}, torch::dtype(torch::kFloat32));
    float* pd = padded.data_ptr<float>();
    bnas::parallel_for(rows_to_pad, pad_chunk, pad_threads, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float* row = pd + i * row_values;
        const int64_t n = i / g.Hp, r = image_row(i);
        if (r < 0) {
          std::fill(row, row + row_values, 0.0f);
          continue;
        }
        std::fill(row, row + border_values, 0.0f);
        std::fill(row + border_values + inner_values, row + row_values, 0.0f);
        if (channels_last)
          std::memcpy(row + border_values, xs + (n * g.H + r) * g.W * g.C, sizeof(float) * inner_values);
        else
          bnas::nchw_row_to_nhwc(xs, g, n, r, row + border_values);
      }
    });
    const float* wt = weights.data_ptr<float>();
    run([&](int64_t n, int64_t oh, float* row) { bnas::float_conv_row_avx512(pd, wt, b, g, n, oh, row); });
    return {out, packed};
  }

  TORCH_CHECK(w_scale.has_value() && w_sum.has_value() &&
                  w_scale->scalar_type() == torch::kFloat32 && w_scale->numel() == out_channels &&
                  w_sum->scalar_type() == torch::kInt32 && w_sum->numel() == out_channels,
              "image_conv_nhwc: int8 weights need float32 scales and int32 sums, one per output");
  // the images' own ranges, or the pixel grid the caller gives (the same for every image)
  const std::vector<bnas::Int8Quantization> qz =
      grid_scale > 0.0 ? std::vector<bnas::Int8Quantization>(
                             static_cast<size_t>(g.N),
                             bnas::Int8Quantization{static_cast<float>(grid_scale), static_cast<int32_t>(grid_zero_point)})
                       : bnas::int8_image_quantizations(xs, g.N, image_floats);
  const torch::Tensor w_sum_c = w_sum->contiguous(), w_scale_c = w_scale->contiguous();
  const bnas::Int8ImageTerms terms =
      bnas::int8_image_terms(qz, w_sum_c.data_ptr<int32_t>(), w_scale_c.data_ptr<float>(), out_channels, g.Kp);
  const int8_t* wq = weights.data_ptr<int8_t>();
  // per image: its range, then its bytes (+ 64: a window row's last word may read up to 3
  // bytes past the last image)
  auto padded = torch::empty({g.N * image_values + 64}, torch::dtype(torch::kUInt8));
  uint8_t* pd = padded.data_ptr<uint8_t>();
  std::memset(pd + g.N * image_values, 0, 64);
  bnas::parallel_for(rows_to_pad, pad_chunk, pad_threads, [&](int64_t begin, int64_t end) {
    bnas::CacheLineVector<float> scratch(static_cast<size_t>(channels_last ? 0 : g.W * g.C));
    for (int64_t i = begin; i < end; ++i) {
      uint8_t* row = pd + i * row_values;
      const int64_t n = i / g.Hp, r = image_row(i);
      const uint8_t zp = static_cast<uint8_t>(qz[n].zero_point);  // the padding: zp is 0.0
      if (r < 0) {
        std::memset(row, zp, row_values);
        continue;
      }
      std::memset(row, zp, border_values);
      std::memset(row + border_values + inner_values, zp, row_values - border_values - inner_values);
      bnas::int8_quantize_row(xs, channels_last, g, qz[n], n, r, pd, scratch.data());
    }
  });
  if (bnas::amx_int8_available()) {
    const bnas::AmxInt8Weights amx_weights = bnas::amx_int8_weights(wq, g.kh * g.quads, g.Kp);
    if (!pooled) {
      run([&](int64_t n, int64_t oh, float* row) {
        bnas::int8_conv_row_amx(pd, amx_weights, terms.zp_wsum.data() + n * g.Kp, terms.scale.data() + n * g.Kp, b,
                                g, n, oh, row);
      });
      return {out, packed};
    }
    // the ring holds each conv row's int32 sums; the epilogue runs on the pooled maxima
    bnas::conv_max_pool_rows(
        g, pg, threads, o, pk,
        [&](int64_t n, int64_t oh, float* row) {
          bnas::int8_conv_sums_row_amx(pd, amx_weights, g, n, oh, reinterpret_cast<int32_t*>(row));
        },
        [&](int64_t n, const float* const* rows, int64_t count, float* out_row, uint32_t* packed_row) {
          bnas::max_pool_int8_sums_row_avx512(reinterpret_cast<const int32_t* const*>(rows), count, g.OW, g.K, pg.OW,
                                              pg.kw, pg.sw, pg.pw, terms.zp_wsum.data() + n * g.Kp,
                                              terms.scale.data() + n * g.Kp, b, out_row, packed_row);
        });
    return {out, packed};
  }
  run([&](int64_t n, int64_t oh, float* row) {
    bnas::int8_conv_row_avx512(pd, wq, terms.zp_wsum.data() + n * g.Kp, terms.scale.data() + n * g.Kp, b, g, n, oh,
                               row);
  });
  return {out, packed};
}

// ---------------------------------------------------------------------------------------
// The kernel calls a ProgramRunner replays (program_runner.h, bnas.export.program): `kind`
// names an entry point above, `args` are the arguments Python binds after the input (in the
// order bnas.kernels.cpu_backend's KernelCall.args holds them), `inputs` the slots of the
// input and, for a packed step, of its residual (-1: none). `take` >= 0 keeps one tensor of
// a call that returns two. Each call is the one the Python program makes, argument for
// argument, so the outputs are the same bit for bit.
// ---------------------------------------------------------------------------------------
template <class T>
T program_arg(const py::tuple& args, size_t i) {
  return args[i].cast<T>();
}

using bnas::program_input;
using bnas::program_tensor;

bnas::ProgramValue program_pair(torch::Tensor first, torch::Tensor second, int64_t take) {
  if (take == 0) return {std::move(first), torch::Tensor(), false};
  if (take == 1) return {std::move(second), torch::Tensor(), false};
  return {std::move(first), std::move(second), true};
}

// A fused step's residual: none (slot -1), or the value channels_last (no copy when it is,
// as in Python).
c10::optional<torch::Tensor> step_residual(const bnas::ProgramInputs& env, int64_t slot) {
  if (slot < 0) return c10::nullopt;
  return program_input(env, slot).contiguous(at::MemoryFormat::ChannelsLast);
}

// A fused step's value from its [float, packed] outputs: both as a pair (or the one `take`
// keeps), else the one it wrote.
bnas::ProgramValue step_value(const std::vector<torch::Tensor>& out, bool float_output, bool pack_output, int64_t take) {
  if (float_output && pack_output) return program_pair(out[0], out[1], take);
  return bnas::ProgramValue{float_output ? out[0] : out[1], torch::Tensor(), false};
}

bnas::ProgramFunction program_kernel(const std::string& kind, const std::vector<int64_t>& inputs,
                                     const py::tuple& a, int64_t take) {
  if (kind.rfind("torch.", 0) == 0) {
    TORCH_CHECK(take < 0, "ProgramRunner: ", kind, " returns one tensor");
    return bnas::program_torch_op(kind.substr(6), inputs, a);
  }
  TORCH_CHECK(!inputs.empty() && inputs[0] >= 0, "ProgramRunner: ", kind, " needs an input slot");
  const int64_t x = inputs[0];
  auto expect = [&](size_t count) {
    TORCH_CHECK(a.size() == count, "ProgramRunner: ", kind, " takes ", count, " arguments, got ", a.size());
  };
  if (kind == "conv2d_packed_fused") {
    // lanes, in and out channels, kh, kw, sh, sw, ph, pw, dh, dw, groups, scale, bias,
    // float_output, pack_output, into_residual, pack_threshold, rprelu ([] or its three
    // parameters), isa, the groups to pack a float input in first (0: the input comes packed)
    // and the threshold it is packed against
    expect(22);
    TORCH_CHECK(inputs.size() == 2, "ProgramRunner: a packed step has an input and a residual slot");
    const int64_t residual_slot = inputs[1];
    const torch::Tensor lanes = program_arg<torch::Tensor>(a, 0);
    std::array<int64_t, 10> geometry{};  // in and out channels, then the 8 of the conv
    for (size_t i = 0; i < geometry.size(); ++i) geometry[i] = program_arg<int64_t>(a, 1 + i);
    const int64_t groups = program_arg<int64_t>(a, 11);
    const auto scale = program_tensor(a, 12), bias = program_tensor(a, 13);
    const bool float_output = program_arg<bool>(a, 14), pack_output = program_arg<bool>(a, 15);
    const bool into_residual = program_arg<bool>(a, 16);
    const auto pack_threshold = program_tensor(a, 17);
    const auto rprelu = program_arg<std::vector<torch::Tensor>>(a, 18);
    const int64_t isa = program_arg<int64_t>(a, 19), pack_groups = program_arg<int64_t>(a, 20);
    const auto threshold = program_tensor(a, 21);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const c10::optional<torch::Tensor> residual = step_residual(env, residual_slot);
      const torch::Tensor& in = program_input(env, x);
      const torch::Tensor xp = pack_groups > 0 ? pack_signs(in, pack_groups, isa, threads, threshold) : in;
      const std::vector<torch::Tensor> out = conv2d_packed_fused(
          xp, lanes, geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5], geometry[6],
          geometry[7], geometry[8], geometry[9], groups, scale, bias, residual, float_output, pack_output,
          into_residual && residual.has_value(), pack_threshold, rprelu, isa, threads);
      return step_value(out, float_output, pack_output, take);
    };
  }
  if (kind == "grouped_conv_fused") {
    // weight words, channels, channels per group, kh, kw, sh, sw, ph, pw, dh, dw, scale, bias,
    // float_output, pack_output, into_residual, pack_threshold, rprelu, isa
    expect(19);
    TORCH_CHECK(inputs.size() == 2, "ProgramRunner: a packed step has an input and a residual slot");
    const int64_t residual_slot = inputs[1];
    const torch::Tensor words = program_arg<torch::Tensor>(a, 0);
    const int64_t channels = program_arg<int64_t>(a, 1), per_group = program_arg<int64_t>(a, 2);
    std::array<int64_t, 8> geometry{};
    for (size_t i = 0; i < geometry.size(); ++i) geometry[i] = program_arg<int64_t>(a, 3 + i);
    const auto scale = program_tensor(a, 11), bias = program_tensor(a, 12);
    const bool float_output = program_arg<bool>(a, 13), pack_output = program_arg<bool>(a, 14);
    const bool into_residual = program_arg<bool>(a, 15);
    const auto pack_threshold = program_tensor(a, 16);
    const auto rprelu = program_arg<std::vector<torch::Tensor>>(a, 17);
    const int64_t isa = program_arg<int64_t>(a, 18);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const c10::optional<torch::Tensor> residual = step_residual(env, residual_slot);
      const std::vector<torch::Tensor> out = grouped_conv_fused(
          program_input(env, x), words, channels, per_group, geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5],
          geometry[6], geometry[7], scale, bias, residual, float_output, pack_output,
          into_residual && residual.has_value(), pack_threshold, rprelu, isa, threads);
      return step_value(out, float_output, pack_output, take);
    };
  }
  if (kind == "image_conv_nhwc" || kind == "image_conv_nhwc_or_conv2d") {
    // weights, w_scale, w_sum, bias, out_channels, kh, kw, sh, sw, ph, pw, the pool's kh, kw,
    // sh, sw, ph, pw, pack_output, grid_scale, grid_zero_point; the _or_conv2d kind also the
    // conv's weight and bias and the multiply-adds per image below which a stem is PyTorch's
    // conv on the channels_last image (bnas.export.plan.ImageConv2d.small_float_stem)
    const bool or_conv2d = kind == "image_conv_nhwc_or_conv2d";
    expect(or_conv2d ? 23 : 20);
    TORCH_CHECK(!or_conv2d || take == 0, "ProgramRunner: ", kind, " keeps the map alone");
    const torch::Tensor conv_weight = or_conv2d ? program_arg<torch::Tensor>(a, 20) : torch::Tensor();
    const auto conv_bias = or_conv2d ? program_tensor(a, 21) : c10::nullopt;
    const int64_t min_macs = or_conv2d ? program_arg<int64_t>(a, 22) : 0;
    const torch::Tensor weights = program_arg<torch::Tensor>(a, 0);
    const auto w_scale = program_tensor(a, 1), w_sum = program_tensor(a, 2), bias = program_tensor(a, 3);
    std::array<int64_t, 13> geometry{};
    for (size_t i = 0; i < geometry.size(); ++i) geometry[i] = program_arg<int64_t>(a, 4 + i);
    const bool pack_output = program_arg<bool>(a, 17);
    const double grid_scale = program_arg<double>(a, 18);
    const int64_t grid_zero_point = program_arg<int64_t>(a, 19);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const torch::Tensor& in = program_input(env, x);
      if (or_conv2d && in.dim() == 4) {
        const int64_t kh = geometry[1], kw = geometry[2], sh = geometry[3], sw = geometry[4];
        const int64_t ph = geometry[5], pw = geometry[6];
        auto out_size = [](int64_t span, int64_t stride) { return span < 0 ? 0 : span / stride + 1; };
        const int64_t oh = out_size(in.size(2) + 2 * ph - kh, sh), ow = out_size(in.size(3) + 2 * pw - kw, sw);
        if (geometry[0] * in.size(1) * kh * kw * oh * ow < min_macs)
          return bnas::ProgramValue{
              bnas::channels_last_conv2d(in, conv_weight, conv_bias, {sh, sw}, {ph, pw})};
      }
      auto [out, packed] = image_conv_nhwc(
          in, weights, w_scale, w_sum, bias, geometry[0], geometry[1], geometry[2],
          geometry[3], geometry[4], geometry[5], geometry[6], geometry[7], geometry[8], geometry[9],
          geometry[10], geometry[11], geometry[12], pack_output, grid_scale, grid_zero_point, threads);
      return program_pair(std::move(out), std::move(packed), take);
    };
  }
  if (kind == "conv2d_max_pool") {
    // weight, bias, sh, sw, ph, pw, the pool's kh, kw, sh, sw, ph, pw, pack_output, isa: PyTorch's
    // conv on the channels_last image and its max-pool, channels_last, and the pooled map's
    // packed signs (bnas.kernels.conv2d_max_pool without the AVX-512 kernel)
    expect(14);
    const torch::Tensor weight = program_arg<torch::Tensor>(a, 0);
    const auto bias = program_tensor(a, 1);
    std::array<int64_t, 10> geometry{};
    for (size_t i = 0; i < geometry.size(); ++i) geometry[i] = program_arg<int64_t>(a, 2 + i);
    const bool pack_output = program_arg<bool>(a, 12);
    const int64_t isa = program_arg<int64_t>(a, 13);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const torch::Tensor conv = bnas::channels_last_conv2d(program_input(env, x), weight, bias,
                                                            {geometry[0], geometry[1]}, {geometry[2], geometry[3]});
      torch::Tensor pooled = at::max_pool2d(conv, {geometry[4], geometry[5]}, {geometry[6], geometry[7]},
                                            {geometry[8], geometry[9]})
                                 .contiguous(at::MemoryFormat::ChannelsLast);
      if (!pack_output) return bnas::ProgramValue{pooled};
      torch::Tensor packed = pack_signs(pooled, 1, isa, threads);
      return program_pair(std::move(pooled), std::move(packed), take);
    };
  }
  if (kind == "max_pool2d_nhwc") {
    expect(8);  // kh, kw, sh, sw, ph, pw, isa, pack_output
    std::array<int64_t, 7> geometry{};
    for (size_t i = 0; i < geometry.size(); ++i) geometry[i] = program_arg<int64_t>(a, i);
    const bool pack_output = program_arg<bool>(a, 7);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      auto [out, packed] = max_pool2d_nhwc(program_input(env, x), geometry[0], geometry[1], geometry[2], geometry[3],
                                           geometry[4], geometry[5], geometry[6], threads, pack_output);
      return program_pair(std::move(out), std::move(packed), take);
    };
  }
  TORCH_CHECK(take < 0, "ProgramRunner: ", kind, " returns one tensor");
  if (kind == "pointwise_conv_nhwc") {
    expect(6);  // transposed weights, out_channels, bias, pool, ceil_mode, stride
    const torch::Tensor wt = program_arg<torch::Tensor>(a, 0);
    const int64_t out_channels = program_arg<int64_t>(a, 1);
    const auto bias = program_tensor(a, 2);
    const int64_t pool = program_arg<int64_t>(a, 3), stride = program_arg<int64_t>(a, 5);
    const bool ceil_mode = program_arg<bool>(a, 4);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {  // channels_last first, as in Python
      const torch::Tensor in = program_input(env, x).contiguous(at::MemoryFormat::ChannelsLast);
      return bnas::ProgramValue{pointwise_conv_nhwc(in, wt, out_channels, bias, pool, ceil_mode, stride, threads)};
    };
  }
  if (kind == "int8_pointwise_conv_nhwc" || kind == "int8_linear") {
    // weights, w_scale, w_sum, out_channels, bias, pool, ceil_mode, stride; int8_linear: an
    // (N, C) input as the (N, C, 1, 1) map, the output as (N, K)
    expect(8);
    const torch::Tensor weights = program_arg<torch::Tensor>(a, 0), w_scale = program_arg<torch::Tensor>(a, 1);
    const torch::Tensor w_sum = program_arg<torch::Tensor>(a, 2);
    const int64_t out_channels = program_arg<int64_t>(a, 3);
    const auto bias = program_tensor(a, 4);
    const int64_t pool = program_arg<int64_t>(a, 5), stride = program_arg<int64_t>(a, 7);
    const bool ceil_mode = program_arg<bool>(a, 6), rows = kind == "int8_linear";
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const torch::Tensor& given = program_input(env, x);  // a map channels_last first, as in Python
      const torch::Tensor in = rows ? given : given.contiguous(at::MemoryFormat::ChannelsLast);
      TORCH_CHECK(!rows || in.dim() == 2, "ProgramRunner: int8_linear takes (N, C) rows");
      const torch::Tensor out = int8_pointwise_conv_nhwc(rows ? in.view({in.size(0), in.size(1), 1, 1}) : in, weights,
                                                         w_scale, w_sum, out_channels, bias, pool, ceil_mode, stride,
                                                         threads);
      return bnas::ProgramValue{rows ? out.view({in.size(0), out_channels}) : out};
    };
  }
  if (kind == "linear_packed_float") {
    // lanes, in_features, out_features, scale, bias, isa, threshold: the rows' signs packed first
    expect(7);
    const torch::Tensor lanes = program_arg<torch::Tensor>(a, 0);
    const int64_t in_features = program_arg<int64_t>(a, 1), out_features = program_arg<int64_t>(a, 2);
    const auto scale = program_tensor(a, 3), bias = program_tensor(a, 4);
    const int64_t isa = program_arg<int64_t>(a, 5);
    const auto threshold = program_tensor(a, 6);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const torch::Tensor xp = pack_signs(program_input(env, x), 1, isa, threads, threshold);
      return bnas::ProgramValue{linear_packed(xp, lanes, in_features, out_features, scale, bias, false, isa, threads)};
    };
  }
  if (kind == "real_binary_linear") {
    expect(5);  // masks, out_features, scale, bias, isa
    const torch::Tensor masks = program_arg<torch::Tensor>(a, 0);
    const int64_t out_features = program_arg<int64_t>(a, 1);
    const auto scale = program_tensor(a, 2), bias = program_tensor(a, 3);
    const int64_t isa = program_arg<int64_t>(a, 4);
    return [=](const bnas::ProgramInputs& env, int64_t) {
      return bnas::ProgramValue{real_binary_linear(program_input(env, x), masks, out_features, scale, bias, isa)};
    };
  }
  if (kind == "global_avg_pool_nhwc") {
    expect(0);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      return bnas::ProgramValue{global_avg_pool_nhwc(program_input(env, x), threads)};
    };
  }
  if (kind == "linear_rows") {
    expect(2);  // weight, bias
    const torch::Tensor w = program_arg<torch::Tensor>(a, 0);
    const auto bias = program_tensor(a, 1);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      return bnas::ProgramValue{linear_rows(program_input(env, x), w, bias, threads)};
    };
  }
  TORCH_CHECK(false, "ProgramRunner: no kernel call of kind '", kind, "'");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bnas XNOR-popcount CPU kernels";
  m.attr("ISA_POPCNT") = static_cast<int>(ISA_POPCNT);
  m.attr("ISA_AVX2") = static_cast<int>(ISA_AVX2);
  m.attr("ISA_AVX512") = static_cast<int>(ISA_AVX512);
  m.def("isa_supported", &isa_supported, "whether this CPU runs the given code path");
  m.def("lanes", [](int64_t isa) { return lanes_of(static_cast<int>(isa)); },
        "output channels per SIMD vector for a code path");
  m.def("repack_weights", &repack_weights, "packed conv weights -> the kernel's lane layout");
  m.def("conv2d_packed", &conv2d_packed, "XNOR-popcount conv2d on packed NHWC input");
  m.def("grouped_conv_fused", &grouped_conv_fused,
        "grouped binary conv of 1-16 channels a group on a float map (channels in SIMD lanes) with the fused "
        "epilogue; [float, packed]");
  m.def("conv2d_packed_fused", &conv2d_packed_fused,
        "XNOR-popcount conv2d with a residual input and float and/or packed outputs");
  m.def("linear_packed", &linear_packed, "XNOR-popcount linear on packed (N, words) input");
  m.def("repack_real_weights", &repack_real_weights,
        "packed (K, words) weights -> 16-channel masks for real_binary_linear");
  m.def("real_binary_linear", &real_binary_linear,
        "real input x 1-bit weights linear layer, * scale + bias");
  m.def("max_pool2d_nhwc", &max_pool2d_nhwc,
        "max-pool of a channels_last float32 map (and its packed signs, with pack_output)");
  m.def("pointwise_conv_nhwc", &pointwise_conv_nhwc,
        "1x1 float conv of a channels_last map, optionally on its 2x2/2 average pool");
  m.def("int8_pointwise_conv_nhwc", &int8_pointwise_conv_nhwc,
        "1x1 conv of a channels_last map (optionally on its 2x2/2 average pool) in 8-bit integers");
  m.def("global_avg_pool_nhwc", &global_avg_pool_nhwc, "mean over the pixels of a channels_last float32 map: (N, C)");
  m.def("linear_rows", &linear_rows, "float linear layer x w^T + bias, weight rows split among threads");
  m.def("int8_supported", &int8_supported, "whether this CPU runs image_conv_nhwc on int8 weights (AVX-512 VNNI)");
  m.def("amx_int8_supported", &bnas::amx_int8_hardware,
        "whether this CPU and kernel run AMX-INT8 tiles (the int8 convs then use them)");
  m.def("amx_int8_enabled", &bnas::amx_int8_available,
        "whether the int8 convs use AMX tiles now (the CPU and kernel have them, and the switch is on)");
  m.def("set_amx_int8_enabled", [](bool enabled) { return bnas::amx_int8_switch().exchange(enabled); },
        "let the int8 convs use AMX (default; BNAS_AMX=0 turns it off) or not; returns the previous setting");
  m.def("image_conv_nhwc", &image_conv_nhwc,
        "float conv of an image, float32 or int8 (per-image uint8 image, or on a given pixel grid; per-channel "
        "int8 weights), optionally with the max-pool after it and the pooled map's packed signs");
  m.def("pack_signs", &pack_signs,
        "float NCHW (or (N, F)) -> packed NHWC sign bits: x >= 0, or x >= a threshold per channel");
  bnas::bind_work_pool(m);
  auto still_held = [](const py::list& held) {
    // each (dict, name, object): dict.get(name) is object (a module's parameter or buffer
    // still the tensor a call was bound to); in C, as a forward's Python is slow cold
    for (const py::handle item : held) {
      PyObject* entry = item.ptr();
      if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3 || !PyDict_Check(PyTuple_GET_ITEM(entry, 0)))
        throw py::type_error("still_held takes (dict, name, object) tuples");
      PyObject* now = PyDict_GetItemWithError(PyTuple_GET_ITEM(entry, 0), PyTuple_GET_ITEM(entry, 1));
      if (now == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if ((now == nullptr ? Py_None : now) != PyTuple_GET_ITEM(entry, 2)) return false;
    }
    return true;
  };
  py::class_<bnas::ProgramRunner>(m, "ProgramRunner",
                                  "a lowered packed network's kernel calls, replayed without Python between them")
      .def(py::init<int64_t>(), py::arg("slots"))
      .def(
          "kernel",
          [](bnas::ProgramRunner& runner, int64_t out, const std::string& kind, std::vector<int64_t> inputs,
             const py::tuple& args, int64_t take, std::vector<int64_t> drops) {
            runner.add(out, program_kernel(kind, inputs, args, take), std::move(drops));
          },
          "value `out` = the kernel call `kind` on the values in `inputs`, with `args`; then drop `drops`")
      .def("getitem", &bnas::ProgramRunner::getitem, "value `out` = one tensor of the pair in `source`")
      .def("set_output", &bnas::ProgramRunner::set_output)
      .def("remember", &bnas::ProgramRunner::remember, py::arg("x"), py::arg("at_most"),
           "run inputs of x's dtype, device, sizes and strides from now on (at most `at_most` layouts)")
      .def("known_inputs", &bnas::ProgramRunner::known_inputs)
      .def("known", &bnas::ProgramRunner::known, "whether inputs of x's layout run here")
      .def_static("still_held", still_held, "whether, for each (dict, name, object) tuple, dict.get(name) is object")
      .def("watch_versions", &bnas::ProgramRunner::watch_versions,
           "[(tensor, version)]: the tensors versions_unchanged checks")
      .def("versions_unchanged", &bnas::ProgramRunner::versions_unchanged)
      .def(
          "run",
          [](const bnas::ProgramRunner& runner, const torch::Tensor& x, int64_t threads) {
            py::gil_scoped_release released;
            return runner.run(x, threads, nullptr);
          },
          "the program's output for x")
      .def(
          "run_known",
          [](const bnas::ProgramRunner& runner, const torch::Tensor& x, int64_t threads) -> py::object {
            if (!runner.known(x)) return py::none();
            torch::Tensor out;
            {
              py::gil_scoped_release released;
              out = runner.run(x, threads, nullptr);
            }
            return py::cast(out);
          },
          "the program's output for x, or None for an input layout not remembered")
      .def(
          "run_timed",
          [](const bnas::ProgramRunner& runner, const torch::Tensor& x, int64_t threads) {
            std::vector<double> seconds;
            torch::Tensor out;
            {
              py::gil_scoped_release released;
              out = runner.run(x, threads, &seconds);
            }
            return std::make_pair(out, seconds);
          },
          "(output, each instruction's seconds)");
}
