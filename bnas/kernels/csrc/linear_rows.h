// A float linear layer for a few input rows: out (N, K) = x (N, C) times w (K, C) transposed,
// plus bias. A network's classifier at batch 1 (ResNet's 512 -> 1000 head) reads 2 MB of
// weights for 0.5 M multiply-adds: memory-bound, and by the end of a forward the weights have
// left the cache. PyTorch runs it on one thread; here the weight rows are split among the
// threads, so on two cores each streams half of them.
//
// A step takes J <= 4 weight rows and R <= 4 input rows (R * J accumulators of 16 lanes) and
// walks the channels 16 at a time, the last 16 masked: every weight vector is loaded once per
// step and serves R input rows. Each output sums its 16 lanes' partial sums at the end, then
// adds the bias (PyTorch sums in another order: results agree to float rounding).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "register_blocks.h"
#include "work_pool.h"

namespace bnas {

template <int R, int J>
__attribute__((target("avx512f"))) inline void linear_rows_step(const float* x, const float* w, int64_t C,
                                                                 int64_t K, int64_t k0, const float* bias,
                                                                 float* out) {
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = first_lanes(C - c);
    __m512 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, x + r * C + c);
    for (int j = 0; j < J; ++j) {
      const __m512 wv = _mm512_maskz_loadu_ps(m, w + (k0 + j) * C + c);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_fmadd_ps(wv, xv[r], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j)
      out[r * K + k0 + j] = _mm512_reduce_add_ps(acc[r][j]) + (bias ? bias[k0 + j] : 0.0f);
}

template <int R>
inline auto linear_rows_step_for(int weight_rows) {
  switch (weight_rows) {
    case 1: return &linear_rows_step<R, 1>;
    case 2: return &linear_rows_step<R, 2>;
    case 3: return &linear_rows_step<R, 3>;
    default: return &linear_rows_step<R, 4>;
  }
}

// linear_rows_step<min(input_rows, 4), min(weight_rows, 4)>
inline auto pick_linear_rows_step(int input_rows, int weight_rows) {
  switch (input_rows) {
    case 1: return linear_rows_step_for<1>(weight_rows);
    case 2: return linear_rows_step_for<2>(weight_rows);
    case 3: return linear_rows_step_for<3>(weight_rows);
    default: return linear_rows_step_for<4>(weight_rows);
  }
}

// out (N, K) = x (N, C) w (K, C)^T + bias (bias may be null). Items are blocks of 4 weight rows;
// a thread walks all input rows, 4 at a time, for each of its blocks.
inline void linear_rows_avx512(const float* x, const float* w, const float* bias, float* out, int64_t N,
                               int64_t C, int64_t K, int threads) {
  constexpr int64_t kRowsPerItem = 4;
  const int64_t items = (K + kRowsPerItem - 1) / kRowsPerItem;
  const int use = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(threads), items, N * C * K / 262144 + 1})));
  parallel_for(items, std::max<int64_t>(1, items / (4 * use)), use, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k0 = item * kRowsPerItem;
      const int weight_rows = static_cast<int>(std::min<int64_t>(kRowsPerItem, K - k0));
      for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const int input_rows = static_cast<int>(std::min<int64_t>(4, N - n0));
        pick_linear_rows_step(input_rows, weight_rows)(x + n0 * C, w, C, K, k0, bias, out + n0 * K);
      }
    }
  });
}

}  // namespace bnas
