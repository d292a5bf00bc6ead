// The float pools of a packed network on channels_last maps: the max-pool (with the packed
// signs after it) and the global average pool.
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

}  // namespace
