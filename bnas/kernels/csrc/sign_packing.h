// Signs of float maps and rows packed into the kernels' words, against 0 or a threshold per
// channel.
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

#include "binary_conv.h"
#include "work_pool.h"

// Internal linkage: compiled into the one translation unit xnor_cpu.cpp, whose module
// (PYBIND11_MODULE) binds these functions for Python.
namespace {

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

}  // namespace
