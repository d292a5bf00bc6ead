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
#pragma once

#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "register_blocks.h"
#include "work_pool.h"

// Internal linkage: compiled into the one translation unit xnor_cpu.cpp, whose module
// (PYBIND11_MODULE) binds these functions for Python.
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

}  // namespace
