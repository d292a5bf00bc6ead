// Portable building blocks shared by the CUDA build (nvcc) and the host warp emulator (g++).
//
// Everything the XNOR kernels do, except the 1-bit `mma` instruction and the asynchronous
// copies, is written as BNAS_HD (__host__ __device__) code so the emulator executes the very
// same functions on the CPU.  No torch header is included anywhere under this folder except
// binding.cpp, so `nvcc -c xnor_conv.cu` works on a machine without torch.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#define BNAS_HD __host__ __device__ __forceinline__
#define BNAS_DEVICE __device__ __forceinline__
#else
#define BNAS_HD inline
#endif

// No-alias promise for the epilogue's pointers (the output never overlaps scale or bias).
#ifdef __CUDACC__
#define BNAS_RESTRICT __restrict__
#else
#define BNAS_RESTRICT __restrict
#endif

// Loop unrolling hint for nvcc; g++ (emulator build) unrolls on its own.
#ifdef __CUDACC__
#define BNAS_UNROLL _Pragma("unroll")
#else
#define BNAS_UNROLL
#endif

namespace bnas_cuda {

BNAS_HD int popc32(uint32_t v) {
#ifdef __CUDA_ARCH__
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// Index of the lowest set bit of a non-zero 64-bit mask.
BNAS_HD int lowest_bit64(uint64_t v) {
#ifdef __CUDA_ARCH__
  return __ffsll(static_cast<long long>(v)) - 1;
#else
  return __builtin_ctzll(v);
#endif
}

// The epilogue computes y = fl(fl(dot * scale) + bias), two roundings, exactly like the
// elementwise torch expression `dot * scale + bias`.  The explicit _rn intrinsics stop nvcc
// from contracting it into one FMA (which rounds once and could flip a sign at y ~ 0);
// the host build is compiled with -ffp-contract=off for the same reason.
BNAS_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

BNAS_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

BNAS_HD int imin(int a, int b) { return a < b ? a : b; }
BNAS_HD int imax(int a, int b) { return a > b ? a : b; }
BNAS_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace bnas_cuda
