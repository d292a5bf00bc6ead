// Grouped binary convs of 1, 2, 4 or 8 channels a group, on the float map they read.
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

}  // namespace
