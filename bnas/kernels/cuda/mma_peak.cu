// Register-only throughput microbenchmark of mma.sync.m16n8k256 .b1 .and.popc: the 1-bit
// peak that benchmarks/cuda_xnor_conv.py compares the convolution against.  Each warp keeps
// kMmaPeakIlp independent accumulator sets so the tensor pipe never waits on a dependency.
#include <cuda_runtime.h>

#include "launch.h"
#include "mma_b1.cuh"

namespace bnas_cuda {

__global__ void mma_peak_kernel(int32_t* out, int iters) {
  const uint32_t t = threadIdx.x + 1;
  const uint32_t a[4] = {t * 0x9E3779B9u, t * 0x85EBCA6Bu, t * 0xC2B2AE35u, t * 0x27D4EB2Fu};
  const uint32_t b[2] = {t * 0x165667B1u, t * 0xD3A2646Cu};
  int32_t acc[kMmaPeakIlp][4];
#pragma unroll
  for (int j = 0; j < kMmaPeakIlp; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0;
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < kMmaPeakIlp; ++j) mma_m16n8k256_b1_and_popc(acc[j], a, b);
  }
  int32_t sum = 0;
#pragma unroll
  for (int j = 0; j < kMmaPeakIlp; ++j) sum += acc[j][0] + acc[j][1] + acc[j][2] + acc[j][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// One warp, one instruction: D = mma(A, B, C) from per-lane fragment registers in global
// memory (a: 32x4, b: 32x2, c and d: 32x4, lane-major).  Lets the GPU test compare the
// hardware with the emulator's software model directly.
__global__ void mma_single_kernel(const uint32_t* a, const uint32_t* b, const int32_t* c, int32_t* d) {
  const int l = threadIdx.x;
  const uint32_t ra[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
  const uint32_t rb[2] = {b[2 * l], b[2 * l + 1]};
  int32_t rc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
  mma_m16n8k256_b1_and_popc(rc, ra, rb);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = rc[i];
}

const char* launch_mma_single(const uint32_t* a, const uint32_t* b, const int32_t* c, int32_t* d, cudaStream_t stream) {
  mma_single_kernel<<<1, 32, 0, stream>>>(a, b, c, d);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

const char* launch_mma_peak(int32_t* out, int blocks, int threads, int iters, cudaStream_t stream) {
  if (blocks < 1 || threads < 32 || threads % 32 != 0 || threads > 1024 || iters < 1)
    return "mma_peak: need blocks >= 1, threads a multiple of 32 in [32, 1024], iters >= 1";
  mma_peak_kernel<<<blocks, threads, 0, stream>>>(out, iters);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace bnas_cuda
