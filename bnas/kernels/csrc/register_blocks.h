// Register-blocked kernels (the 1x1 shortcut conv, the stem convs): a step computes P
// output pixels times NV vectors of 16 output channels, P * NV accumulators in zmm registers,
// so every weight load serves P pixels and every broadcast input value NV vectors. The last
// block of a row or of the channels is smaller: block_step picks the step for the sizes left.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace bnas {

constexpr int kBlockPixels = 6;   // P: with 4 vectors, 24 accumulators of the 32 registers
constexpr int kBlockVectors = 4;  // NV

// The mask of the first min(n, 16) lanes of a 16-lane vector (n >= 0).
inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : ((1u << n) - 1u));
}

template <class Kernel, int P>
auto block_step_for_pixels(int vectors) {
  switch (vectors) {
    case 1: return &Kernel::template step<P, 1>;
    case 2: return &Kernel::template step<P, 2>;
    case 3: return &Kernel::template step<P, 3>;
    default: return &Kernel::template step<P, 4>;
  }
}

// Kernel::step<P, NV> for P = min(pixels, 6), NV = min(vectors, 4) (both >= 1).
template <class Kernel>
auto block_step(int pixels, int vectors) {
  switch (pixels) {
    case 1: return block_step_for_pixels<Kernel, 1>(vectors);
    case 2: return block_step_for_pixels<Kernel, 2>(vectors);
    case 3: return block_step_for_pixels<Kernel, 3>(vectors);
    case 4: return block_step_for_pixels<Kernel, 4>(vectors);
    case 5: return block_step_for_pixels<Kernel, 5>(vectors);
    default: return block_step_for_pixels<Kernel, 6>(vectors);
  }
}

// The float epilogue: outs[p][n0 + 16 v + lane] = acc[p][v] + bias (bias may be null); the
// last vector stores only last_lanes.
template <int P, int NV>
__attribute__((target("avx512f"))) inline void store_with_bias(const __m512 (&acc)[P][NV],
                                                               const float* bias, int64_t n0,
                                                               __mmask16 last_lanes,
                                                               float* const* outs) {
  for (int v = 0; v < NV; ++v) {
    const __mmask16 lanes = v == NV - 1 ? last_lanes : static_cast<__mmask16>(0xFFFF);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(lanes, bias + n0 + 16 * v) : _mm512_setzero_ps();
    for (int p = 0; p < P; ++p)
      _mm512_mask_storeu_ps(outs[p] + n0 + 16 * v, lanes, _mm512_add_ps(acc[p][v], b));
  }
}

}  // namespace bnas
