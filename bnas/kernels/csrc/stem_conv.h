// Float convs on the image: a binary network's stem (few input channels, a wide kernel), and
// the max-pool after it. ResNet's 7x7/2 stem has 118 M MACs at 224x224 and writes a 3.2 MB map
// that its 3x3/2 max-pool reads again; together they take more time than the 16 binary convs.
//
// Two precisions, one layout. The image is written once as padded NHWC values, so a window row
// of kw pixels is kw * C consecutive values; output channels sit in SIMD lanes, and a step
// takes P <= 6 output pixels and NV <= 4 vectors of 16 output channels (P * NV accumulators).
//
// * float32 (float_conv_row_avx512): every value of the window row is broadcast and multiplied
//   with one weight vector per 16 output channels, FMA in float32, summed over window rows and
//   then along the row (PyTorch's convs pick another order: results agree to float rounding).
//   Weights: (kh, kw * C, Kp) floats, Kp the output channels rounded up to 16.
// * int8 (int8_conv_row_avx512), AVX-512 VNNI: VPDPBUSD does 64 8-bit multiply-adds per
//   instruction against 16 float FMAs. The window row's kw * C bytes are read as `quads` =
//   ceil(kw * C / 4) 32-bit words; each is broadcast and multiplied with a weight vector holding,
//   per output channel (one per 32-bit lane), the 4 weights of those 4 bytes (zero past kw * C:
//   the word's extra bytes belong to the next pixel and count for nothing). Weights: (kh, quads,
//   Kp, 4) int8. Quantization (the Python reference, bnas.kernels.int8.int8_conv2d_reference,
//   does the same float32 operations, so results are equal bit for bit):
//     each image (of the batch), asymmetric: lo = min(min x, 0), hi = max(max x, 0),
//       s = (hi - lo) / 255 (1 when that is 0), zp = clamp(round(-lo / s), 0, 255),
//       q = clamp(round(x / s) + zp, 0, 255) as uint8 (round half to even); padding is zp (0.0);
//     weights, per output channel, symmetric int8 (done once, in Python).
//     out[k] = float(acc[k] - zp * sum(wq[k])) * (s * w_scale[k]) + bias[k], acc the exact
//     int32 sum of q * wq (no overflow: the caller limits taps so that |acc| < 2^24, where the
//     int -> float conversion is exact too).
//
// conv_max_pool: the conv's rows go to a ring of `pool kh` rows that the pool reads while they
// are in cache, so the conv's full output is never written to memory; the pooled values are
// those of the separate conv and pool, exactly. In int8 (VNNI or AMX) the ring holds the exact
// int32 sums and the epilogue runs on each window's largest only.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "cache_line_vector.h"
#include "register_blocks.h"
#include "work_pool.h"

namespace bnas {

struct ImageConvGeometry {
  int64_t N, C, H, W;     // image
  int64_t K, OH, OW;      // output
  int64_t kh, kw, sh, sw, ph, pw;
  int64_t Hp, Wp;         // padded image
  int64_t quads;          // 32-bit words per window row
  int64_t Kp;             // output channels rounded up to 16
};

struct Int8Quantization {
  float scale;
  int32_t zero_point;
};

// Image range -> scale and zero point, as the Python reference computes them.
inline Int8Quantization int8_image_quantization(float lo, float hi) {
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  float s = (hi - lo) / 255.0f;
  if (!(s > 0.0f)) s = 1.0f;  // an all-zero image: any scale represents it
  const float zp = std::nearbyint(-lo / s);
  return {s, static_cast<int32_t>(std::min(255.0f, std::max(0.0f, zp)))};
}

// min and max of n floats.
__attribute__((target("avx512f"))) inline void int8_min_max(const float* x, int64_t n, float* lo,
                                                            float* hi) {
  __m512 vlo = _mm512_set1_ps(INFINITY), vhi = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
  }
  float l = _mm512_reduce_min_ps(vlo), h = _mm512_reduce_max_ps(vhi);
  for (; i < n; ++i) {
    l = std::min(l, x[i]);
    h = std::max(h, x[i]);
  }
  *lo = l;
  *hi = h;
}

// Each of the N images of `values` floats (consecutive in x): its scale and zero point.
inline std::vector<Int8Quantization> int8_image_quantizations(const float* x, int64_t N, int64_t values) {
  std::vector<Int8Quantization> qz(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) {
    float lo = 0.0f, hi = 0.0f;
    int8_min_max(x + n * values, values, &lo, &hi);
    qz[static_cast<size_t>(n)] = int8_image_quantization(lo, hi);
  }
  return qz;
}

// What the int8 epilogue needs of each image n, for output channels k < K in rows of Kp (zero
// past K): zp_wsum = zp * sum(wq[k]), the correction of the zero point; scale = s * w_scale[k].
struct Int8ImageTerms {
  CacheLineVector<int32_t> zp_wsum;
  CacheLineVector<float> scale;
};
inline Int8ImageTerms int8_image_terms(const std::vector<Int8Quantization>& qz, const int32_t* w_sum,
                                       const float* w_scale, int64_t K, int64_t Kp) {
  Int8ImageTerms t{CacheLineVector<int32_t>(qz.size() * static_cast<size_t>(Kp), 0),
                   CacheLineVector<float>(qz.size() * static_cast<size_t>(Kp), 0.0f)};
  for (size_t n = 0; n < qz.size(); ++n)
    for (int64_t k = 0; k < K; ++k) {
      t.zp_wsum[n * Kp + k] = qz[n].zero_point * w_sum[k];
      t.scale[n * Kp + k] = qz[n].scale * w_scale[k];
    }
  return t;
}

// 16 floats -> clamp(round(x / s) + zp, 0, 255) as int32 lanes.
__attribute__((target("avx512f"))) inline __m512i int8_quantize16(__m512 v, __m512 s, __m512 zp) {
  __m512 q = _mm512_roundscale_ps(_mm512_div_ps(v, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_add_ps(q, zp);
  q = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), _mm512_set1_ps(255.0f));
  return _mm512_cvtps_epi32(q);
}

// Row r of image n of an NCHW float32 image in NHWC order: dst[w * C + c] = x[n, c, r, w].
// One channel is a copy; three (RGB) move 16 pixels per step, each 16-value output vector put
// together by two AVX-512 permutes; other channel counts go a value at a time.
__attribute__((target("avx512f"))) inline void nchw_row_to_nhwc(const float* x, const ImageConvGeometry& g,
                                                               int64_t n, int64_t r, float* dst) {
  const float* plane0 = x + (n * g.C * g.H + r) * g.W;
  const int64_t plane = g.H * g.W;
  if (g.C == 1) {
    std::memcpy(dst, plane0, sizeof(float) * g.W);
    return;
  }
  if (g.C != 3) {
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t w = 0; w < g.W; ++w) dst[w * g.C + c] = plane0[c * plane + w];
    return;
  }
  // Output vector k holds values e = 16k + j (pixel e / 3, channel e % 3): the first permute
  // takes channels 0 and 1 from planes 0 and 1, the second channel 2 from plane 2.
  alignas(64) int32_t from01[3][16], from2[3][16];
  for (int k = 0; k < 3; ++k) {
    for (int j = 0; j < 16; ++j) {
      const int e = 16 * k + j, p = e / 3, c = e % 3;
      from01[k][j] = c == 0 ? p : c == 1 ? 16 + p : 0;
      from2[k][j] = c == 2 ? 16 + p : j;
    }
  }
  for (int64_t w0 = 0; w0 < g.W; w0 += 16) {
    const int64_t nl = std::min<int64_t>(16, g.W - w0);
    const __mmask16 m = first_lanes(nl);
    const __m512 a = _mm512_maskz_loadu_ps(m, plane0 + w0), b = _mm512_maskz_loadu_ps(m, plane0 + plane + w0),
                 c = _mm512_maskz_loadu_ps(m, plane0 + 2 * plane + w0);
    float* out = dst + 3 * w0;
    for (int k = 0; k < 3; ++k) {
      const int64_t left = 3 * nl - 16 * k;  // values of this step still to write
      if (left <= 0) break;
      const __m512 ab = _mm512_permutex2var_ps(a, _mm512_load_si512(from01[k]), b);
      const __m512 v = _mm512_permutex2var_ps(ab, _mm512_load_si512(from2[k]), c);
      _mm512_mask_storeu_ps(out + 16 * k, first_lanes(std::min<int64_t>(16, left)), v);
    }
  }
}

// Row r of image n (float32, NCHW or channels_last contiguous) quantized into the padded
// NHWC bytes. An NCHW row is put in NHWC order first (`row`: W * C floats of scratch).
__attribute__((target("avx512f,avx512bw"))) inline void int8_quantize_row(
    const float* x, bool channels_last, const ImageConvGeometry& g, Int8Quantization qz, int64_t n,
    int64_t r, uint8_t* padded, float* row) {
  const __m512 s = _mm512_set1_ps(qz.scale), zp = _mm512_set1_ps(static_cast<float>(qz.zero_point));
  uint8_t* dst = padded + ((n * g.Hp + r + g.ph) * g.Wp + g.pw) * g.C;
  const float* src = x + (n * g.H + r) * g.W * g.C;
  if (!channels_last) {
    nchw_row_to_nhwc(x, g, n, r, row);
    src = row;
  }
  const int64_t len = g.W * g.C;  // the row is W * C consecutive floats, in the padded row's order
  for (int64_t i = 0; i < len; i += 16) {
    const int64_t nl = std::min<int64_t>(16, len - i);
    const __mmask16 m = first_lanes(nl);
    _mm512_mask_cvtepi32_storeu_epi8(dst + i, m, int8_quantize16(_mm512_maskz_loadu_ps(m, src + i), s, zp));
  }
}

// The int8 epilogue on 16 channels' int32 sums, the terms loaded: float(sum - zp_wsum) *
// scale + bias, one multiply and one add rounded to float32 (every int8 kernel's, so all agree
// bit for bit with bnas.kernels.int8's reference).
__attribute__((target("avx512f"))) inline __m512 int8_epilogue(__m512i sum, __m512i zp_wsum, __m512 scale,
                                                              __m512 bias) {
  return _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum, zp_wsum)), scale), bias);
}

// The exact int32 sums of P pixels' windows (windows[p], window rows row_bytes apart) with
// output channels n0 .. n0 + 16 * NV, into acc.
template <int P, int NV>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void int8_window_sums(
    const uint8_t* const* windows, int64_t row_bytes, const ImageConvGeometry& g, const int8_t* wq, int64_t n0,
    __m512i (&acc)[P][NV]) {
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = _mm512_setzero_si512();
  for (int64_t r = 0; r < g.kh; ++r) {
    for (int64_t q = 0; q < g.quads; ++q) {
      const int8_t* w_row = wq + ((r * g.quads + q) * g.Kp + n0) * 4;
      __m512i w[NV];
      for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(w_row + 64 * v);
      for (int p = 0; p < P; ++p) {
        int32_t word;
        std::memcpy(&word, windows[p] + r * row_bytes + 4 * q, 4);
        const __m512i x = _mm512_set1_epi32(word);
        for (int v = 0; v < NV; ++v) acc[p][v] = _mm512_dpbusd_epi32(acc[p][v], x, w[v]);
      }
    }
  }
}

struct Int8ConvBlock {
  template <int P, int NV>
  static __attribute__((target("avx512f,avx512bw,avx512vnni"))) void step(
      const uint8_t* const* windows, int64_t row_bytes, const ImageConvGeometry& g,
      const int8_t* wq, int64_t n0, const int32_t* const* zp_wsum, const float* const* scale,
      const float* bias, __mmask16 last_lanes, float* const* outs) {
    __m512i acc[P][NV];
    int8_window_sums<P, NV>(windows, row_bytes, g, wq, n0, acc);
    for (int v = 0; v < NV; ++v) {
      const int64_t k0 = n0 + 16 * v;
      const __mmask16 lanes = v == NV - 1 ? last_lanes : static_cast<__mmask16>(0xFFFF);
      const __m512 b = bias ? _mm512_maskz_loadu_ps(lanes, bias + k0) : _mm512_setzero_ps();
      for (int p = 0; p < P; ++p) {  // each pixel's image has its own zero point and scale
        const __m512i corr = _mm512_maskz_loadu_epi32(lanes, zp_wsum[p] + k0);
        const __m512 sc = _mm512_maskz_loadu_ps(lanes, scale[p] + k0);
        _mm512_mask_storeu_ps(outs[p] + k0, lanes, int8_epilogue(acc[p][v], corr, sc, b));
      }
    }
  }
};

// The same sums, stored as they are (outs[p] as int32): for a max-pool after the conv, whose
// epilogue then runs on the pooled maxima only (max_pool_int8_sums_row_avx512).
struct Int8SumsBlock {
  template <int P, int NV>
  static __attribute__((target("avx512f,avx512bw,avx512vnni"))) void step(const uint8_t* const* windows,
                                                                          int64_t row_bytes,
                                                                          const ImageConvGeometry& g,
                                                                          const int8_t* wq, int64_t n0,
                                                                          __mmask16 last_lanes, float* const* outs) {
    __m512i acc[P][NV];
    int8_window_sums<P, NV>(windows, row_bytes, g, wq, n0, acc);
    for (int v = 0; v < NV; ++v) {
      const __mmask16 lanes = v == NV - 1 ? last_lanes : static_cast<__mmask16>(0xFFFF);
      for (int p = 0; p < P; ++p)
        _mm512_mask_storeu_epi32(reinterpret_cast<int32_t*>(outs[p]) + n0 + 16 * v, lanes, acc[p][v]);
    }
  }
};

// Every block of output row oh of image n: step(count, windows, outs, nv, n0, last_lanes) with
// `count` pixels whose windows start at windows[p] in the padded image and whose K outputs go
// to outs[p] in `row`, and output channels n0 .. n0 + 16 * nv (the last vector's valid lanes
// in last_lanes).
template <class T, class Step>
inline void for_each_block(const T* padded, const ImageConvGeometry& g, int64_t n, int64_t oh,
                           float* row, const Step& step) {
  const int64_t vectors = (g.K + 15) / 16;
  const T* windows[kBlockPixels];
  float* outs[kBlockPixels];
  for (int64_t ow0 = 0; ow0 < g.OW; ow0 += kBlockPixels) {
    const int count = static_cast<int>(std::min<int64_t>(kBlockPixels, g.OW - ow0));
    for (int p = 0; p < count; ++p) {
      windows[p] = padded + ((n * g.Hp + oh * g.sh) * g.Wp + (ow0 + p) * g.sw) * g.C;
      outs[p] = row + (ow0 + p) * g.K;
    }
    for (int64_t v0 = 0; v0 < vectors; v0 += kBlockVectors) {
      const int nv = static_cast<int>(std::min<int64_t>(kBlockVectors, vectors - v0));
      const int64_t last = g.K - 16 * (v0 + nv - 1);
      const __mmask16 last_lanes = first_lanes(last);
      step(count, windows, outs, nv, 16 * v0, last_lanes);
    }
  }
}

// Output row oh of image n into `row` (OW * K floats). zp_wsum and scale hold zp * sum(wq[k])
// and s * w_scale[k] of image n.
inline void int8_conv_row_avx512(const uint8_t* padded, const int8_t* wq, const int32_t* zp_wsum,
                                 const float* scale, const float* bias, const ImageConvGeometry& g,
                                 int64_t n, int64_t oh, float* row) {
  const int32_t* corrs[kBlockPixels];
  const float* scales[kBlockPixels];
  for (int p = 0; p < kBlockPixels; ++p) corrs[p] = zp_wsum, scales[p] = scale;
  for_each_block(padded, g, n, oh, row,
                 [&](int count, const uint8_t* const* windows, float* const* outs, int nv, int64_t n0,
                     __mmask16 last_lanes) {
                   block_step<Int8ConvBlock>(count, nv)(windows, g.Wp * g.C, g, wq, n0, corrs, scales,
                                                        bias, last_lanes, outs);
                 });
}

// The exact int32 sums of output row oh of image n into `sums` (OW * K int32, no zero-point
// correction yet), as int8_conv_sums_row_amx gives them.
inline void int8_conv_sums_row_avx512(const uint8_t* padded, const int8_t* wq, const ImageConvGeometry& g, int64_t n,
                                      int64_t oh, int32_t* sums) {
  for_each_block(padded, g, n, oh, reinterpret_cast<float*>(sums),
                 [&](int count, const uint8_t* const* windows, float* const* outs, int nv, int64_t n0,
                     __mmask16 last_lanes) {
                   block_step<Int8SumsBlock>(count, nv)(windows, g.Wp * g.C, g, wq, n0, last_lanes, outs);
                 });
}

// ---- int8 on AMX tiles (amx_tiles.h) -------------------------------------------------------
// The same sums as int8_conv_row_avx512, as a matrix product: an A tile holds 64 bytes of 16
// output pixels' windows, a B tile the weights of those 64 bytes for 16 output channels (16
// quads x 16 channels x 4 bytes, the VNNI layout above), with output channels padded to a
// multiple of 32. Tiles are not renamed, so a step works a 2 x 2 block: two A tiles (32
// pixels) and two B tiles (32 channels), each loaded once and used twice, into four C tiles;
// the last 16 pixels of a row, if odd, take a 1 x 2 block. The image conv first copies its 32
// pixels' windows into consecutive rows (im2col: window row r's quads at quad r * quads,
// kh * quads quads padded to a multiple of 16). AMX reads such rows faster than the windows
// where they lie in a layout that makes them contiguous (for the 7x7/2 stem, rows in groups
// of two interleaved per column, read by tile loads with a 12-byte stride and 256 bytes a
// window: the 224x224 stem and its pool took 0.35-0.46 ms against 0.31-0.32 with im2col,
// interleaved in one process). A 1x1 conv's pixels are its windows already. The epilogue is
// the VNNI kernel's, operation for operation.
struct AmxInt8Weights {
  const int8_t* quads;  // (k_steps * 16, Kpa, 4)
  int64_t k_steps;      // steps of 64 input bytes
  int64_t Kpa;          // output channels rounded up to 32
  CacheLineVector<int8_t> padded;  // the weights in that layout, where the caller's are not already

  AmxInt8Weights() = default;
  AmxInt8Weights(AmxInt8Weights&&) = default;  // a moved vector keeps its buffer: `quads` stays valid
  AmxInt8Weights(const AmxInt8Weights&) = delete;
  AmxInt8Weights& operator=(const AmxInt8Weights&) = delete;
};

// Weights in the VNNI layout, `quads` words of 4 input bytes by Kp output channels (a 1x1
// conv's (1, ceil(C / 4), Kp, 4); the image conv's (kh, quads, Kp, 4), whose window rows are
// the im2col rows' quads in the same order), for the tiles: used in place when quads % 16 == 0
// and Kp % 32 == 0, else copied with zeros past them.
inline AmxInt8Weights amx_int8_weights(const int8_t* wq, int64_t quads, int64_t Kp) {
  AmxInt8Weights w;
  w.k_steps = (quads + 15) / 16;
  w.Kpa = (Kp + 31) / 32 * 32;
  w.quads = wq;
  if (w.k_steps * 16 == quads && w.Kpa == Kp) return w;
  w.padded.assign(static_cast<size_t>(w.k_steps * 16 * w.Kpa * 4), 0);
  for (int64_t q = 0; q < quads; ++q)
    std::memcpy(w.padded.data() + q * w.Kpa * 4, wq + q * Kp * 4, static_cast<size_t>(Kp * 4));
  w.quads = w.padded.data();
  return w;
}

// sums (16 * MB pixels, c_stride bytes apart) = A x weights, where step t's A rows are the
// 64 bytes at a_steps[t] + p * a_stride (pixel p), MB = 1 or 2 tiles of pixels; tiles: C 0-3,
// A 4-5, B 6-7.
template <int MB>
__attribute__((target("amx-tile,amx-int8"))) inline void amx_int8_block(const uint8_t* const* a_steps, int64_t a_stride,
                                                                       const AmxInt8Weights& w, int32_t* sums,
                                                                       int64_t c_stride) {
  const int64_t b_stride = w.Kpa * 4, second = 16 * a_stride;
  int32_t* sums1 = sums + 16 * (c_stride / 4);
  for (int64_t j0 = 0; j0 < w.Kpa; j0 += 32) {
    _tile_zero(0);
    _tile_zero(1);
    if (MB == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t t = 0; t < w.k_steps; ++t) {
      const int8_t* b = w.quads + (16 * t * w.Kpa + j0) * 4;
      _tile_loadd(4, a_steps[t], a_stride);
      _tile_loadd(6, b, b_stride);
      _tile_loadd(7, b + 64, b_stride);
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
      if (MB == 2) {
        _tile_loadd(5, a_steps[t] + second, a_stride);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
      }
    }
    _tile_stored(0, sums + j0, c_stride);
    _tile_stored(1, sums + j0 + 16, c_stride);
    if (MB == 2) {
      _tile_stored(2, sums1 + j0, c_stride);
      _tile_stored(3, sums1 + j0 + 16, c_stride);
    }
  }
}

// The exact int32 sums of output row oh of image n into `out` (OW * K int32, no zero-point
// correction yet), from the padded NHWC image.
__attribute__((target("amx-tile,amx-int8,avx2,avx512f,avx512bw"))) inline void int8_conv_sums_row_amx(
    const uint8_t* padded, const AmxInt8Weights& w, const ImageConvGeometry& g, int64_t n, int64_t oh,
    int32_t* out) {
  const int64_t window_bytes = g.quads * 4, row_bytes = g.Wp * g.C, a_stride = w.k_steps * 64;
  thread_local CacheLineVector<uint8_t> window_scratch;  // 32 pixels' im2col rows
  thread_local CacheLineVector<int32_t> sum_scratch;     // 32 pixels x Kpa
  thread_local std::vector<const uint8_t*> steps;
  if (window_scratch.size() < static_cast<size_t>(32 * a_stride + 32))  // + 32: the last 32-byte move
    window_scratch.assign(static_cast<size_t>(32 * a_stride + 32), 0);
  if (sum_scratch.size() < static_cast<size_t>(32 * w.Kpa)) sum_scratch.resize(static_cast<size_t>(32 * w.Kpa));
  steps.resize(static_cast<size_t>(w.k_steps));
  uint8_t* const windows = window_scratch.data();
  for (int64_t t = 0; t < w.k_steps; ++t) steps[static_cast<size_t>(t)] = windows + 64 * t;
  int32_t* const scratch = sum_scratch.data();
  static const AmxTileConfig config = amx_full_tiles(8);
  AmxTileScope tiles(config);
  const __mmask64 tail = window_bytes % 64 == 0 ? ~0ULL : (1ULL << (window_bytes % 64)) - 1;
  const uint8_t* const image_row = padded + (n * g.Hp + oh * g.sh) * row_bytes;
  const int64_t kh = g.kh, K = g.K, pixel_step = g.sw * g.C;
  for (int64_t ow0 = 0; ow0 < g.OW; ow0 += 32) {
    const int64_t count = std::min<int64_t>(32, g.OW - ow0);
    // rows past `count` keep earlier windows: their sums are computed and never read
    const uint8_t* pixel = image_row + ow0 * pixel_step;
    for (int64_t p = 0; p < count; ++p, pixel += pixel_step) {
      const uint8_t* src = pixel;
      uint8_t* dst = windows + p * a_stride;
      if (window_bytes <= 32) {
        // 32-byte moves: the bytes past a window row land where the next row (or the next
        // pixel's first) is written after, or in the zero-weight padding of the last
        for (int64_t r = 0; r < kh; ++r, src += row_bytes, dst += window_bytes)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
        continue;
      }
      for (int64_t r = 0; r < kh; ++r, src += row_bytes, dst += window_bytes) {
        int64_t b0 = 0;
        for (; b0 + 64 < window_bytes; b0 += 64) _mm512_storeu_si512(dst + b0, _mm512_loadu_si512(src + b0));
        _mm512_mask_storeu_epi8(dst + b0, tail, _mm512_maskz_loadu_epi8(tail, src + b0));
      }
    }
    const int mb = count > 16 ? 2 : 1;
    // whole tiles of pixels and no padded channels: the tiles go straight to the output
    const bool direct = count == 16 * mb && w.Kpa == K;
    int32_t* sums = direct ? out + ow0 * K : scratch;
    const int64_t c_stride = (direct ? K : w.Kpa) * 4;
    if (mb == 2)
      amx_int8_block<2>(steps.data(), a_stride, w, sums, c_stride);
    else
      amx_int8_block<1>(steps.data(), a_stride, w, sums, c_stride);
    if (!direct)
      for (int64_t p = 0; p < count; ++p)
        std::memcpy(out + (ow0 + p) * K, scratch + p * w.Kpa, sizeof(int32_t) * K);
  }
}

// int8_epilogue with its terms loaded from memory (lanes masked; bias may be null).
__attribute__((target("avx512f"))) inline __m512 int8_epilogue16(__m512i sum, __mmask16 lanes, const int32_t* zp_wsum,
                                                                const float* scale, const float* bias) {
  const __m512 b = bias ? _mm512_maskz_loadu_ps(lanes, bias) : _mm512_setzero_ps();
  return int8_epilogue(sum, _mm512_maskz_loadu_epi32(lanes, zp_wsum), _mm512_maskz_loadu_ps(lanes, scale), b);
}

// Output row oh of image n into `row` (OW * K floats), as int8_conv_row_avx512 computes it.
__attribute__((target("avx512f"))) inline void int8_conv_row_amx(const uint8_t* padded, const AmxInt8Weights& w,
                                                                 const int32_t* zp_wsum, const float* scale,
                                                                 const float* bias, const ImageConvGeometry& g,
                                                                 int64_t n, int64_t oh, float* row) {
  // the sums in place of the floats: each value is read before its float is written
  int32_t* sums = reinterpret_cast<int32_t*>(row);
  int8_conv_sums_row_amx(padded, w, g, n, oh, sums);
  for (int64_t k0 = 0; k0 < g.K; k0 += 16) {
    const __mmask16 lanes = first_lanes(g.K - k0);
    for (int64_t p = 0; p < g.OW; ++p) {
      const __m512i sum = _mm512_maskz_loadu_epi32(lanes, sums + p * g.K + k0);
      _mm512_mask_storeu_ps(row + p * g.K + k0, lanes, int8_epilogue16(sum, lanes, zp_wsum + k0, scale + k0,
                                                                       bias ? bias + k0 : nullptr));
    }
  }
}

// ---- float32 ------------------------------------------------------------------------------
struct FloatConvBlock {
  template <int P, int NV>
  static __attribute__((target("avx512f"))) void step(const float* const* windows,
                                                        int64_t row_floats,
                                                        const ImageConvGeometry& g,
                                                        const float* wt, int64_t n0,
                                                        const float* bias, __mmask16 last_lanes,
                                                        float* const* outs) {
    __m512 acc[P][NV];
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < NV; ++v) acc[p][v] = _mm512_setzero_ps();
    const int64_t taps = g.kw * g.C;  // one window row
    for (int64_t r = 0; r < g.kh; ++r) {
      for (int64_t j = 0; j < taps; ++j) {
        const float* w_row = wt + (r * taps + j) * g.Kp + n0;
        __m512 w[NV];
        for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(w_row + 16 * v);
        for (int p = 0; p < P; ++p) {
          const __m512 x = _mm512_set1_ps(windows[p][r * row_floats + j]);
          for (int v = 0; v < NV; ++v) acc[p][v] = _mm512_fmadd_ps(w[v], x, acc[p][v]);
        }
      }
    }
    store_with_bias<P, NV>(acc, bias, n0, last_lanes, outs);
  }
};

// Output row oh of image n into `row` (OW * K floats) from the padded float image (N, Hp, Wp,
// C) and the weights (kh, kw * C, Kp).
inline void float_conv_row_avx512(const float* padded, const float* wt, const float* bias,
                                  const ImageConvGeometry& g, int64_t n, int64_t oh, float* row) {
  for_each_block(padded, g, n, oh, row,
                 [&](int count, const float* const* windows, float* const* outs, int nv, int64_t n0,
                     __mmask16 last_lanes) {
                   block_step<FloatConvBlock>(count, nv)(windows, g.Wp * g.C, g, wt, n0, bias,
                                                         last_lanes, outs);
                 });
}

// ---- the conv alone, or the conv and a max-pool -------------------------------------------
// `conv_row(n, oh, row)` writes output row oh of image n (OW * K floats).

// out (N, OH, OW, K) float32, row by row.
template <class ConvRow>
void conv_rows(const ImageConvGeometry& g, int threads, float* out, const ConvRow& conv_row) {
  const int64_t rows = g.N * g.OH;
  const int64_t macs_per_row = g.OW * g.kh * g.kw * g.C * g.K;
  const int use = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(threads), rows, rows * macs_per_row / 4194304 + 1})));
  parallel_for(rows, std::max<int64_t>(1, rows / (4 * use)), use, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) conv_row(r / g.OH, r % g.OH, out + r * g.OW * g.K);
  });
}

struct PoolAfterConv {
  int64_t kh, kw, sh, sw, ph, pw;  // the pool's
  int64_t OH, OW;                  // pooled
};

// One row of a max-pool over channels_last maps, as its OW outputs of C floats: columns (kw, sw,
// pw) give each output's window [iw0, iw1), already cut to the map, and window(iw0, iw1, c,
// lanes) gives the output's channels c .. c + 15 (the lanes valid). `packed` (may be null): the
// outputs' signs as NHWC words (bit 1 where the value >= 0), for a binary conv that reads the
// pooled map.
template <class Window>
__attribute__((target("avx512f"))) inline void pool_row_avx512(int64_t W, int64_t C, int64_t OW, int64_t kw,
                                                               int64_t sw, int64_t pw, float* out, uint32_t* packed,
                                                               const Window& window) {
  const int64_t words = (C + 31) / 32;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t ow = 0; ow < OW; ++ow) {
    const int64_t iw0 = std::max<int64_t>(0, ow * sw - pw);
    const int64_t iw1 = std::min<int64_t>(W, ow * sw - pw + kw);
    float* o = out + ow * C;
    uint32_t* pk = packed ? packed + ow * words : nullptr;
    uint32_t word = 0;
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 lanes = first_lanes(C - c);
      const __m512 v = window(iw0, iw1, c, lanes);
      _mm512_mask_storeu_ps(o + c, lanes, v);
      if (pk) {  // c is a multiple of 16: these lanes are bits (c % 32) .. of word c / 32
        word |= static_cast<uint32_t>(_mm512_mask_cmp_ps_mask(lanes, v, zero, _CMP_GE_OQ)) << (c & 31);
        if ((c & 31) == 16 || c + 16 >= C) {
          pk[c / 32] = word;
          word = 0;
        }
      }
    }
  }
}

// A max-pool row as pool_row_avx512 computes it, for C = 16 * NV channels (NV <= 4): every
// load a full vector, and the window loop over all NV vectors at once. V is the values'
// vector (floats, or the int8 conv's int32 sums): load(p) reads one, max(a, b) takes the larger
// of two, `lowest` starts a window, and finish(v, m) gives vector v's floats from its maxima.
template <int NV, class T, class V, class Load, class Max, class Finish>
__attribute__((target("avx512f"))) inline void max_pool_row_vectors(const T* const* rows, int64_t count, int64_t W,
                                                                    int64_t OW, int64_t kw, int64_t sw, int64_t pw,
                                                                    float* out, uint32_t* packed, V lowest,
                                                                    const Load& load, const Max& max,
                                                                    const Finish& finish) {
  constexpr int64_t C = 16 * NV, words = (C + 31) / 32;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t ow = 0; ow < OW; ++ow) {
    const int64_t iw0 = std::max<int64_t>(0, ow * sw - pw);
    const int64_t iw1 = std::min<int64_t>(W, ow * sw - pw + kw);
    V m[NV];
    for (int v = 0; v < NV; ++v) m[v] = lowest;
    for (int64_t i = 0; i < count; ++i)
      for (const T *p = rows[i] + iw0 * C, *e = rows[i] + iw1 * C; p < e; p += C)
        for (int v = 0; v < NV; ++v) m[v] = max(m[v], load(p + 16 * v));
    uint32_t bits[NV];
    for (int v = 0; v < NV; ++v) {
      const __m512 f = finish(v, m[v]);
      _mm512_storeu_ps(out + ow * C + 16 * v, f);
      bits[v] = _mm512_cmp_ps_mask(f, zero, _CMP_GE_OQ);
    }
    if (packed)
      for (int64_t word = 0; word < words; ++word)
        packed[ow * words + word] = bits[2 * word] | (2 * word + 1 < NV ? bits[2 * word + 1] << 16 : 0u);
  }
}

// max_pool_row_vectors over floats.
template <int NV>
__attribute__((target("avx512f"))) inline void max_pool_float_row_vectors(const float* const* rows, int64_t count,
                                                                          int64_t W, int64_t OW, int64_t kw,
                                                                          int64_t sw, int64_t pw, float* out,
                                                                          uint32_t* packed) {
  max_pool_row_vectors<NV>(
      rows, count, W, OW, kw, sw, pw, out, packed, _mm512_set1_ps(-INFINITY),
      [](const float* p) __attribute__((target("avx512f"))) { return _mm512_loadu_ps(p); },
      [](__m512 a, __m512 b) __attribute__((target("avx512f"))) { return _mm512_max_ps(a, b); },
      [](int, __m512 m) __attribute__((target("avx512f"))) { return m; });
}

// One row of a max-pool over channels_last float maps: `rows` are the `count` input rows (W
// pixels of C floats) the row's windows cover, already cut to the map. Padding never wins (as
// in PyTorch).
__attribute__((target("avx512f"))) inline void max_pool_row_avx512(const float* const* rows,
                                                                   int64_t count, int64_t W,
                                                                   int64_t C, int64_t OW,
                                                                   int64_t kw, int64_t sw,
                                                                   int64_t pw, float* out,
                                                                   uint32_t* packed) {
  switch (C) {  // ResNet's 3x3/2 pool on 112x112x64 with its signs: 0.070 against 0.135 ms (Zen 4)
    case 16: return max_pool_float_row_vectors<1>(rows, count, W, OW, kw, sw, pw, out, packed);
    case 32: return max_pool_float_row_vectors<2>(rows, count, W, OW, kw, sw, pw, out, packed);
    case 48: return max_pool_float_row_vectors<3>(rows, count, W, OW, kw, sw, pw, out, packed);
    case 64: return max_pool_float_row_vectors<4>(rows, count, W, OW, kw, sw, pw, out, packed);
    default: break;
  }
  pool_row_avx512(W, C, OW, kw, sw, pw, out, packed,
                  [&](int64_t iw0, int64_t iw1, int64_t c, __mmask16 lanes) __attribute__((target("avx512f"))) {
                    __m512 v = _mm512_set1_ps(-INFINITY);
                    for (int64_t i = 0; i < count; ++i)
                      for (int64_t iw = iw0; iw < iw1; ++iw)
                        v = _mm512_max_ps(v, _mm512_maskz_loadu_ps(lanes, rows[i] + iw * C + c));
                    return v;
                  });
}

// max_pool_row_vectors over the int8 conv's int32 sums, the epilogue's terms in registers for
// the whole row.
template <int NV>
__attribute__((target("avx512f"))) inline void max_pool_int8_sums_row_vectors(
    const int32_t* const* rows, int64_t count, int64_t W, int64_t OW, int64_t kw, int64_t sw, int64_t pw,
    const int32_t* zp_wsum, const float* scale, const float* bias, float* out, uint32_t* packed) {
  __m512i corr[NV];
  __m512 sc[NV], b[NV];
  for (int v = 0; v < NV; ++v) {
    corr[v] = _mm512_loadu_si512(zp_wsum + 16 * v);
    sc[v] = _mm512_loadu_ps(scale + 16 * v);
    b[v] = bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps();
  }
  max_pool_row_vectors<NV>(
      rows, count, W, OW, kw, sw, pw, out, packed, _mm512_set1_epi32(INT32_MIN),
      [](const int32_t* p) __attribute__((target("avx512f"))) { return _mm512_loadu_si512(p); },
      [](__m512i x, __m512i y) __attribute__((target("avx512f"))) { return _mm512_max_epi32(x, y); },
      [&](int v, __m512i m) __attribute__((target("avx512f"))) { return int8_epilogue(m, corr[v], sc[v], b[v]); });
}

// max_pool_row_avx512 over the int8 conv's int32 sums, the epilogue applied to each window's
// largest sum: the epilogue is non-decreasing in the sum (its scale s * w_scale is positive,
// and float conversion, multiply and add are monotonic), so this is exactly the epilogue
// first and the max after, with a quarter of the epilogues for a 3x3/2 pool.
__attribute__((target("avx512f"))) inline void max_pool_int8_sums_row_avx512(
    const int32_t* const* rows, int64_t count, int64_t W, int64_t C, int64_t OW, int64_t kw, int64_t sw, int64_t pw,
    const int32_t* zp_wsum, const float* scale, const float* bias, float* out, uint32_t* packed) {
  const auto vectors = [&](auto pool) { pool(rows, count, W, OW, kw, sw, pw, zp_wsum, scale, bias, out, packed); };
  switch (C) {  // 0.35-0.36 against 0.40-0.42 ms for the 224x224 stem and pool, interleaved
    case 16: return vectors(max_pool_int8_sums_row_vectors<1>);
    case 32: return vectors(max_pool_int8_sums_row_vectors<2>);
    case 48: return vectors(max_pool_int8_sums_row_vectors<3>);
    case 64: return vectors(max_pool_int8_sums_row_vectors<4>);
    default: break;
  }
  pool_row_avx512(W, C, OW, kw, sw, pw, out, packed,
                  [&](int64_t iw0, int64_t iw1, int64_t c, __mmask16 lanes) __attribute__((target("avx512f"))) {
                    __m512i v = _mm512_set1_epi32(INT32_MIN);
                    for (int64_t i = 0; i < count; ++i)
                      for (int64_t iw = iw0; iw < iw1; ++iw)
                        v = _mm512_max_epi32(v, _mm512_maskz_loadu_epi32(lanes, rows[i] + iw * C + c));
                    return int8_epilogue16(v, lanes, zp_wsum + c, scale + c, bias ? bias + c : nullptr);
                  });
}

// out (N, pooled OH, OW, K) and `packed` (may be null) = max-pool of the conv's output, which
// goes row by row through a ring of pg.kh rows.
//
// Each image's pooled rows are cut into segments, one per two threads, and a segment is worked
// from both ends at once: one thread claims its rows top-down, another bottom-up, each keeping
// its own ring, until they meet. A thread that comes late, or runs on a slower core, thus
// takes fewer rows instead of holding up a fixed half: on this project's 2-core VM the two
// halves of a fixed split finished ~120 us apart in a 1.3 ms forward's stem; alone, the stem
// took 1.252 against 1.272 ms on 2 threads (224x224, median of 300 alternating calls). Where
// two threads meet, a conv row both windows need is computed twice (one row per segment for
// 3x3/2). Every row is computed and pooled as by one thread, so the result does not depend
// on the split.
//
// pool_row(n, window_rows, count, out_row, packed_row) pools one output row of image n from
// the `count` ring rows its windows cover (conv_row's values: floats, or the int8 sums).
template <class ConvRow, class PoolRow>
void conv_max_pool_rows(const ImageConvGeometry& g, const PoolAfterConv& pg, int threads,
                        float* out, uint32_t* packed, const ConvRow& conv_row, const PoolRow& pool_row) {
  const int64_t segments_per_image = std::max<int64_t>(1, std::min<int64_t>(pg.OH, (threads + 1) / 2));
  const int64_t segments = g.N * segments_per_image;
  const int64_t words = (g.K + 31) / 32;
  // the rows of each segment that no thread has claimed
  std::vector<TwoEndedRange> unclaimed(static_cast<size_t>(segments));
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t part = s % segments_per_image;
    unclaimed[static_cast<size_t>(s)].reset(pg.OH * part / segments_per_image, pg.OH * (part + 1) / segments_per_image);
  }
  const int64_t ends = 2 * segments;  // items: (segment, from its top or its bottom)
  parallel_for(ends, 1, static_cast<int>(std::min<int64_t>(threads, ends)), [&](int64_t begin, int64_t end) {
    const int64_t row_floats = g.OW * g.K;
    CacheLineVector<float> ring(static_cast<size_t>(pg.kh * row_floats));  // conv row ih at slot ih % kh
    std::vector<const float*> window_rows(static_cast<size_t>(pg.kh));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t segment = item / 2, n = segment / segments_per_image;
      const bool from_top = item % 2 == 0;
      // From the top, the last conv row computed (its windows move down); from the bottom,
      // the first (they move up). The ring keeps the last kh rows computed and a window's
      // rows are consecutive, so computing the ones past that row gives the ring all of them.
      int64_t high = -1, low = g.OH;
      for (int64_t poh, poh_end; unclaimed[static_cast<size_t>(segment)].claim(1, from_top, poh, poh_end);) {
        const int64_t ih0 = std::max<int64_t>(0, poh * pg.sh - pg.ph);
        const int64_t ih1 = std::min<int64_t>(g.OH, poh * pg.sh - pg.ph + pg.kh);
        if (from_top) {
          for (int64_t ih = std::max(ih0, high + 1); ih < ih1; ++ih) conv_row(n, ih, ring.data() + (ih % pg.kh) * row_floats);
          high = std::max(high, ih1 - 1);
        } else {
          for (int64_t ih = std::min(ih1, low) - 1; ih >= ih0; --ih) conv_row(n, ih, ring.data() + (ih % pg.kh) * row_floats);
          low = std::min(low, ih0);
        }
        for (int64_t ih = ih0; ih < ih1; ++ih) window_rows[ih - ih0] = ring.data() + (ih % pg.kh) * row_floats;
        pool_row(n, window_rows.data(), ih1 - ih0, out + (n * pg.OH + poh) * pg.OW * g.K,
                 packed ? packed + (n * pg.OH + poh) * pg.OW * words : nullptr);
      }
    }
  });
}

}  // namespace bnas
