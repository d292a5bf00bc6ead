// A linear layer of real inputs and 1-bit weights (a binary network's first layer).
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

}  // namespace
