// 1x1 float convolutions of channels_last maps, optionally on a 2x2/2 average pool of the
// input, for the float shortcuts of binary networks (Bi-Real's downsample: AvgPool2d(2), a 1x1
// conv, BN folded into the conv's bias). PyTorch runs these 6.4 M-MAC convs at about 48 GMAC/s
// on one core of this machine class, under half the rate its 7x7 stem conv reaches, and the
// pool is a separate pass over the map.
//
// A GEMM with output channels in SIMD lanes (register_blocks.h): a step takes P <= 6 output
// pixels and NV <= 4 vectors of 16 output channels, P * NV accumulators in zmm registers;
// every input channel loads NV weight vectors and broadcasts one input value per pixel. The
// pool is computed per block of P pixels into a small buffer, in the order PyTorch's
// channels_last avg-pool sums (((x00 + x01) + x10) + x11) / 4, so the pooled values are
// PyTorch's; the 1x1 conv's sums run over input channels in order and the bias is added last
// (PyTorch's convs pick their own order: results agree to float rounding). Weights come
// transposed, (C, Kp) with Kp the output channels rounded up to 16 and zero columns, so no
// weight load needs a mask.
//
// int8 (int8_pointwise_conv_avx512, opt-in): the same conv in 8-bit integers by the stem's
// rules (stem_conv.h, bnas.kernels.int8), the pooled map standing for the image.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "register_blocks.h"
#include "stem_conv.h"
#include "work_pool.h"

namespace bnas {

struct PointwiseGeometry {
  int64_t N, H, W, C;  // input, channels_last
  int64_t OH, OW, K;   // output
  int64_t Kp;          // output channels rounded up to 16: the transposed weights' row length
  int64_t pool;        // 2: average 2x2/2 first; 1: none
  bool ceil;           // the pool's ceil mode: odd maps get a last row (column) of partial windows
  int64_t stride;      // without a pool: the conv's stride
};

struct PointwiseBlock {
  template <int P, int NV>
  static __attribute__((target("avx512f"))) void step(const float* const* rows, const float* wt,
                                                      int64_t C, int64_t Kp, int64_t n0,
                                                      const float* bias, __mmask16 last_lanes,
                                                      float* const* outs) {
    __m512 acc[P][NV];
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < NV; ++v) acc[p][v] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const float* w_row = wt + c * Kp + n0;
      __m512 w[NV];
      for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(w_row + 16 * v);
      for (int p = 0; p < P; ++p) {
        const __m512 x = _mm512_set1_ps(rows[p][c]);
        for (int v = 0; v < NV; ++v) acc[p][v] = _mm512_fmadd_ps(w[v], x, acc[p][v]);
      }
    }
    store_with_bias<P, NV>(acc, bias, n0, last_lanes, outs);
  }
};

// (n, oh, ow) -> the next output pixel in (N, OH, OW) order.
inline void next_pixel(const PointwiseGeometry& g, int64_t& n, int64_t& oh, int64_t& ow) {
  if (++ow < g.OW) return;
  ow = 0;
  if (++oh < g.OH) return;
  oh = 0;
  ++n;
}

// The 2x2/2 average of output pixel (oh, ow) of image `img` into `dst` (C floats). A window
// cut by the map's edge (ceil mode) averages the values inside it, as PyTorch does without
// padding.
__attribute__((target("avx512f"))) inline void avg_pool_2x2_avx512(const float* img,
                                                                   const PointwiseGeometry& g,
                                                                   int64_t oh, int64_t ow,
                                                                   float* dst) {
  const int64_t rows = std::min<int64_t>(2, g.H - 2 * oh), cols = std::min<int64_t>(2, g.W - 2 * ow);
  const float* x00 = img + ((2 * oh) * g.W + 2 * ow) * g.C;
  const float* taps[4];
  int count = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) taps[count++] = x00 + (r * g.W + c) * g.C;
  // dividing by 4, 2 or 1 and multiplying by its inverse agree exactly
  const __m512 inverse = _mm512_set1_ps(1.0f / static_cast<float>(count));
  for (int64_t c = 0; c < g.C; c += 16) {
    const int64_t nl = std::min<int64_t>(16, g.C - c);
    const __mmask16 m = first_lanes(nl);
    __m512 s = _mm512_maskz_loadu_ps(m, taps[0] + c);
    for (int t = 1; t < count; ++t) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(m, taps[t] + c));
    _mm512_mask_storeu_ps(dst + c, m, _mm512_mul_ps(s, inverse));
  }
}

// out (N, OH, OW, K) = conv1x1(pool(x)) + bias, x (N, H, W, C), wt (C, Kp); bias may be null.
// Items are (block of P pixels, vector group of output channels); a thread's consecutive items
// share a pixel block, whose pool it computes once.
inline void pointwise_conv_avx512(const float* x, const float* wt, const float* bias, float* out,
                                  const PointwiseGeometry& g, int threads) {
  const int64_t pixels = g.N * g.OH * g.OW;
  const int64_t blocks = (pixels + kBlockPixels - 1) / kBlockPixels;
  const int64_t vectors = (g.K + 15) / 16;
  const int64_t groups = (vectors + kBlockVectors - 1) / kBlockVectors;
  const int64_t items = blocks * groups;
  const int64_t macs_per_item = kBlockPixels * g.C * kBlockVectors * 16;
  const int use = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(threads), items, items * macs_per_item / 262144 + 1})));
  parallel_for(items, std::max<int64_t>(1, items / (4 * use)), use, [&](int64_t begin, int64_t end) {
    CacheLineVector<float> pooled(g.pool == 2 ? static_cast<size_t>(kBlockPixels * g.C) : 0);
    const float* rows[kBlockPixels];
    float* outs[kBlockPixels];
    int64_t ready = -1;  // the pixel block whose rows are set up
    int count = 0;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item / groups, group = item % groups;
      if (block != ready) {
        const int64_t p0 = block * kBlockPixels;
        count = static_cast<int>(std::min<int64_t>(kBlockPixels, pixels - p0));
        // the block's first pixel by division, the next ones by stepping: 64-bit divisions
        // by runtime values, 3 a pixel, cost ~10 % of a 28x28 shortcut's time
        int64_t n = p0 / (g.OH * g.OW), oh = p0 / g.OW % g.OH, ow = p0 % g.OW;
        for (int p = 0; p < count; ++p, next_pixel(g, n, oh, ow)) {
          const int64_t pix = p0 + p;
          const float* img = x + n * g.H * g.W * g.C;
          if (g.pool == 2) {
            avg_pool_2x2_avx512(img, g, oh, ow, pooled.data() + p * g.C);
            rows[p] = pooled.data() + p * g.C;
          } else {
            rows[p] = img + (oh * g.stride * g.W + ow * g.stride) * g.C;
          }
          outs[p] = out + pix * g.K;
        }
        ready = block;
      }
      const int64_t v0 = group * kBlockVectors;
      const int nv = static_cast<int>(std::min<int64_t>(kBlockVectors, vectors - v0));
      const int64_t last = g.K - 16 * (v0 + nv - 1);  // valid lanes of the group's last vector
      const __mmask16 last_lanes = first_lanes(last);
      block_step<PointwiseBlock>(count, nv)(rows, wt, g.C, g.Kp, 16 * v0, bias, last_lanes, outs);
    }
  });
}

// ---- int8 ------------------------------------------------------------------------------

// n floats -> their uint8 values under quantization q (stem_conv.h's rules).
__attribute__((target("avx512f,avx512bw"))) inline void int8_quantize_values(const float* src, int64_t n,
                                                                            Int8Quantization q, uint8_t* dst) {
  const __m512 s = _mm512_set1_ps(q.scale), zp = _mm512_set1_ps(static_cast<float>(q.zero_point));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first_lanes(n - i);
    _mm512_mask_cvtepi32_storeu_epi8(dst + i, m, int8_quantize16(_mm512_maskz_loadu_ps(m, src + i), s, zp));
  }
}

// The fewest pixels a call runs on AMX tiles (int8_pointwise_conv_avx512). Measured on one
// core (us, AMX against VNNI): 512 -> 1000 on 1, 4, 8, 16 and 32 rows 38/13, 40/17, 43/27,
// 50/40 and 70/76; 256 -> 512 on 9, 16 and 49 pixels 10/13, 11/15 and 21/30.
constexpr int64_t kAmxMinPixels = 9;

// The quantized pixels (rows of C bytes) times the weights on AMX tiles
// (stem_conv.h's amx_int8_block: a pixel's C bytes are its window), 32 pixels a block,
// then the VNNI kernel's epilogue, each pixel with its image's terms.
// With `floats` (C % 64 == 0: a tile row is whole pixels), the blocks' own pixels' floats are
// quantized into `bytes` first (then no thread reads bytes another writes).
__attribute__((target("avx512f,avx512bw"))) inline void int8_pointwise_blocks_amx(
    uint8_t* bytes, const AmxInt8Weights& w, const Int8ImageTerms& terms, const float* bias, float* out,
    const PointwiseGeometry& g, int64_t begin, int64_t end, const float* floats = nullptr,
    const std::vector<Int8Quantization>* qz = nullptr) {
  const int64_t image_pixels = g.OH * g.OW, pixels = g.N * image_pixels;
  thread_local CacheLineVector<int32_t> sum_scratch;
  if (sum_scratch.size() < static_cast<size_t>(32 * w.Kpa)) sum_scratch.resize(static_cast<size_t>(32 * w.Kpa));
  int32_t* const sums = sum_scratch.data();
  static const AmxTileConfig config = amx_full_tiles(8);
  AmxTileScope tiles(config);
  std::vector<const uint8_t*> steps(static_cast<size_t>(w.k_steps));
  // the blocks' pixels first, one image at a time: tiles loaded right after their bytes were
  // stored would wait for the stores
  for (int64_t p = 32 * begin, last = std::min(32 * end, pixels); floats != nullptr && p < last;) {
    const int64_t n = p / image_pixels, stop = std::min(last, (n + 1) * image_pixels);
    int8_quantize_values(floats + p * g.C, (stop - p) * g.C, (*qz)[static_cast<size_t>(n)], bytes + p * g.C);
    p = stop;
  }
  for (int64_t block = begin; block < end; ++block) {
    const int64_t p0 = 32 * block, count = std::min<int64_t>(32, pixels - p0);
    for (int64_t t = 0; t < w.k_steps; ++t) steps[static_cast<size_t>(t)] = bytes + p0 * g.C + 64 * t;
    // rows past `count` read the next pixels' (or the buffer's spare) bytes: never used
    if (count > 16)
      amx_int8_block<2>(steps.data(), g.C, w, sums, w.Kpa * 4);
    else
      amx_int8_block<1>(steps.data(), g.C, w, sums, w.Kpa * 4);
    for (int64_t p = 0; p < count;) {  // the block's pixels one image at a time
      const int64_t n = (p0 + p) / image_pixels, stop = std::min(count, (n + 1) * image_pixels - p0);
      const int32_t* corr = terms.zp_wsum.data() + n * g.Kp;
      const float* scale = terms.scale.data() + n * g.Kp;
      for (int64_t k0 = 0; k0 < g.K; k0 += 16) {
        const __mmask16 lanes = first_lanes(g.K - k0);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(lanes, bias + k0) : _mm512_setzero_ps();
        const __m512i c = _mm512_maskz_loadu_epi32(lanes, corr + k0);
        const __m512 sc = _mm512_maskz_loadu_ps(lanes, scale + k0);
        for (int64_t q = p; q < stop; ++q)
          _mm512_mask_storeu_ps(out + (p0 + q) * g.K + k0, lanes,
                                int8_epilogue(_mm512_loadu_si512(sums + q * w.Kpa + k0), c, sc, b));
      }
      p = stop;
    }
  }
}

inline void int8_pointwise_gemm_amx(uint8_t* bytes, const int8_t* wq, const Int8ImageTerms& terms,
                                    const float* bias, float* out, const PointwiseGeometry& g, int use,
                                    const float* floats = nullptr,
                                    const std::vector<Int8Quantization>* qz = nullptr) {
  const AmxInt8Weights w = amx_int8_weights(wq, (g.C + 3) / 4, g.Kp);
  const int64_t blocks = (g.N * g.OH * g.OW + 31) / 32;
  parallel_for(blocks, std::max<int64_t>(1, blocks / (4 * use)), use, [&](int64_t begin, int64_t end) {
    int8_pointwise_blocks_amx(bytes, w, terms, bias, out, g, begin, end, floats, qz);
  });
}

// out = conv1x1(pool(x)) in 8-bit integers: the pooled (or strided) map, PyTorch's values as
// above, is quantized per image to uint8 (its own scale and zero point: a result never
// depends on the rest of the batch), the weights per output channel to int8 (done once, in
// Python: (1, quads, Kp, 4), quads = ceil(C / 4) words of 4 input channels), and VPDPBUSD sums
// exactly in int32, a step being the stem's (Int8ConvBlock) with one window row of C bytes,
// or, on AMX, int8_pointwise_gemm_amx.
// Three passes: the pooled floats with each image's range, the bytes, the GEMM (two on AMX
// threads when C % 64 == 0: each chunk of the GEMM quantizes its own pixels). C <= 518 (the
// caller checks: bnas.kernels.int8.MAX_TAPS), so no sum overflows or rounds.
inline void int8_pointwise_conv_avx512(const float* x, const int8_t* wq, const float* w_scale,
                                       const int32_t* w_sum, const float* bias, float* out,
                                       const PointwiseGeometry& g, int threads) {
  const int64_t image_pixels = g.OH * g.OW, pixels = g.N * image_pixels;
  const int64_t values = pixels * g.C;
  const int use = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(threads), pixels, pixels * g.C * g.K / 262144 + 1})));
  const int64_t pixel_chunk = std::max<int64_t>(1, pixels / (4 * use));
  // kept between calls, and only grown: a fresh buffer of this size costs page faults on every
  // call, and growing a vector back (a network's shortcuts take turns) zero-fills it
  thread_local CacheLineVector<float> pooled;
  thread_local CacheLineVector<uint8_t> bytes;
  if (pooled.size() < static_cast<size_t>(values)) pooled.resize(static_cast<size_t>(values));
  // + 64: a pixel's last word may read 3 bytes past; AMX reads whole tiles of 16 pixels
  const size_t byte_count = static_cast<size_t>((pixels + 31) / 32 * 32 * g.C + 64);
  if (bytes.size() < byte_count) bytes.resize(byte_count);
  float* pd = pooled.data();
  uint8_t* qd = bytes.data();
  // each image's range, found as its pixels are pooled: min and max do not depend on the order
  std::vector<float> lo(static_cast<size_t>(g.N), INFINITY), hi(static_cast<size_t>(g.N), -INFINITY);
  std::mutex range_lock;
  parallel_for(pixels, pixel_chunk, use, [&](int64_t begin, int64_t end) {
    int64_t n = begin / image_pixels, oh = begin / g.OW % g.OH, ow = begin % g.OW;
    for (int64_t pix = begin; pix < end; ++pix, next_pixel(g, n, oh, ow)) {
      const float* img = x + n * g.H * g.W * g.C;
      if (g.pool == 2)
        avg_pool_2x2_avx512(img, g, oh, ow, pd + pix * g.C);
      else
        std::memcpy(pd + pix * g.C, img + (oh * g.stride * g.W + ow * g.stride) * g.C, sizeof(float) * g.C);
    }
    for (int64_t pix = begin; pix < end;) {  // this chunk's part of each image
      const int64_t image = pix / image_pixels, stop = std::min(end, (image + 1) * image_pixels);
      float l = 0.0f, h = 0.0f;
      int8_min_max(pd + pix * g.C, (stop - pix) * g.C, &l, &h);
      const std::lock_guard<std::mutex> hold(range_lock);
      lo[static_cast<size_t>(image)] = std::min(lo[static_cast<size_t>(image)], l);
      hi[static_cast<size_t>(image)] = std::max(hi[static_cast<size_t>(image)], h);
      pix = stop;
    }
  });
  std::vector<Int8Quantization> qz(static_cast<size_t>(g.N));
  for (size_t n = 0; n < qz.size(); ++n) qz[n] = int8_image_quantization(lo[n], hi[n]);
  std::memset(qd + values, 0, 64);
  const Int8ImageTerms terms = int8_image_terms(qz, w_sum, w_scale, g.K, g.Kp);
  const bool amx = amx_int8_available() && pixels >= kAmxMinPixels;
  // on several threads each AMX chunk quantizes its own pixels: one parallel pass fewer, with
  // its barrier (on one thread there is none to save)
  if (amx && g.C % 64 == 0 && use > 1) {
    int8_pointwise_gemm_amx(qd, wq, terms, bias, out, g, use, pd, &qz);
    return;
  }
  parallel_for(pixels, pixel_chunk, use, [&](int64_t begin, int64_t end) {
    while (begin < end) {  // the run of pixels of one image at a time
      const int64_t n = begin / image_pixels, stop = std::min(end, (n + 1) * image_pixels);
      int8_quantize_values(pd + begin * g.C, (stop - begin) * g.C, qz[static_cast<size_t>(n)], qd + begin * g.C);
      begin = stop;
    }
  });
  ImageConvGeometry ig{};  // what Int8ConvBlock reads: one window row of `quads` words
  ig.kh = 1, ig.quads = (g.C + 3) / 4, ig.Kp = g.Kp;
  // AMX computes 16 pixels a tile and reloads every weight per 32-pixel block, their rows
  // Kp * 4 bytes apart: a few pixels against many weights (a classifier at batch 1: 512 -> 1000,
  // 38 against 13 us) run faster on VNNI, which reads the weights once
  if (amx) {
    int8_pointwise_gemm_amx(qd, wq, terms, bias, out, g, use);
    return;
  }
  const int64_t blocks = (pixels + kBlockPixels - 1) / kBlockPixels;
  const int64_t vectors = (g.K + 15) / 16;
  const int64_t groups = (vectors + kBlockVectors - 1) / kBlockVectors;
  const int64_t items = blocks * groups;
  // split by output channels too: a classifier at batch 1 (one pixel, 512 -> 1000) reads its
  // weights from beyond L2 after the rest of the network, each core half of them
  const int gemm_use = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(threads), items, pixels * g.C * g.K / 262144 + 1})));
  parallel_for(items, std::max<int64_t>(1, items / (4 * gemm_use)), gemm_use, [&](int64_t begin, int64_t end) {
    const uint8_t* windows[kBlockPixels];
    float* outs[kBlockPixels];
    const int32_t* corrs[kBlockPixels];
    const float* scales[kBlockPixels];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item / groups, group = item % groups;
      const int64_t p0 = block * kBlockPixels;
      const int count = static_cast<int>(std::min<int64_t>(kBlockPixels, pixels - p0));
      for (int64_t p = 0, n = p0 / image_pixels; p < count; ++p) {
        const int64_t pix = p0 + p;
        if (pix == (n + 1) * image_pixels) ++n;
        windows[p] = qd + pix * g.C;
        outs[p] = out + pix * g.K;
        corrs[p] = terms.zp_wsum.data() + n * g.Kp;
        scales[p] = terms.scale.data() + n * g.Kp;
      }
      const int64_t v0 = group * kBlockVectors;
      const int nv = static_cast<int>(std::min<int64_t>(kBlockVectors, vectors - v0));
      const __mmask16 last_lanes = first_lanes(g.K - 16 * (v0 + nv - 1));
      block_step<Int8ConvBlock>(count, nv)(windows, 0, ig, wq, 16 * v0, corrs, scales, bias, last_lanes, outs);
    }
  });
}

}  // namespace bnas
