// Python entry points of the float kernels (pointwise_conv.h, linear_rows.h, stem_conv.h):
// geometry and argument checks, output allocation, the ISA each needs.
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
#include "linear_rows.h"
#include "pointwise_conv.h"
#include "stem_conv.h"
#include "work_pool.h"

// Internal linkage: compiled into the one translation unit xnor_cpu.cpp, whose module
// (PYBIND11_MODULE) binds these functions for Python.
namespace {

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
  // Pooled: the ring holds each conv row's int32 sums, and the epilogue runs on the pooled
  // maxima only (the 224x224 stem and pool on VNNI: 0.78-0.79 against 0.89-0.90 ms with the
  // epilogue on every conv output and then the float pool, alternating processes, on the Zen 4)
  const auto pool_sums = [&](const auto& sums_row) {
    bnas::conv_max_pool_rows(
        g, pg, threads, o, pk,
        [&](int64_t n, int64_t oh, float* row) { sums_row(n, oh, reinterpret_cast<int32_t*>(row)); },
        [&](int64_t n, const float* const* rows, int64_t count, float* out_row, uint32_t* packed_row) {
          bnas::max_pool_int8_sums_row_avx512(reinterpret_cast<const int32_t* const*>(rows), count, g.OW, g.K, pg.OW,
                                              pg.kw, pg.sw, pg.pw, terms.zp_wsum.data() + n * g.Kp,
                                              terms.scale.data() + n * g.Kp, b, out_row, packed_row);
        });
  };
  if (bnas::amx_int8_available()) {
    const bnas::AmxInt8Weights amx_weights = bnas::amx_int8_weights(wq, g.kh * g.quads, g.Kp);
    if (!pooled) {
      run([&](int64_t n, int64_t oh, float* row) {
        bnas::int8_conv_row_amx(pd, amx_weights, terms.zp_wsum.data() + n * g.Kp, terms.scale.data() + n * g.Kp, b,
                                g, n, oh, row);
      });
      return {out, packed};
    }
    pool_sums([&](int64_t n, int64_t oh, int32_t* sums) { bnas::int8_conv_sums_row_amx(pd, amx_weights, g, n, oh, sums); });
    return {out, packed};
  }
  if (pooled) {
    pool_sums([&](int64_t n, int64_t oh, int32_t* sums) { bnas::int8_conv_sums_row_avx512(pd, wq, g, n, oh, sums); });
    return {out, packed};
  }
  run([&](int64_t n, int64_t oh, float* row) {
    bnas::int8_conv_row_avx512(pd, wq, terms.zp_wsum.data() + n * g.Kp, terms.scale.data() + n * g.Kp, b, g, n, oh,
                               row);
  });
  return {out, packed};
}

}  // namespace
