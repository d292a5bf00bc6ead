// Host entry points of the CUDA XNOR kernels (implemented in xnor_conv.cu and mma_peak.cu).
// Plain C++ over raw device pointers and a stream, so binding.cpp is the only file that
// needs torch.  Each returns nullptr on success or a message saying what went wrong.
#pragma once

#include <cuda_runtime.h>

#include "tiles.h"
#include "xnor_conv.cuh"

namespace bnas_cuda {

enum PackDtype { kPackFloat32 = 0, kPackFloat16 = 1, kPackBFloat16 = 2 };

// a.out_packed (if set) is zeroed here first when some of its words are shared by blocks.
// a.tap_sums must hold the weights' tap sums (launch_tap_sums, once per weight tensor).
const char* launch_xnor_conv(const ConvArgs& a, cudaStream_t stream);
// The split-K slices (conv_splits, tiles.h) for the current device's SM count.
const char* choose_conv_splits(const ConvShape& s, int* splits);
// out: int32 (K, KH*KW) tap sums of the packed weights w of a conv of shape s.
const char* launch_tap_sums(const uint32_t* w, const ConvShape& s, int32_t* out, cudaStream_t stream);
// out: a copy of the packed activations x with the bits past Cg cleared
// (activations_need_tail_clearing, tiles.h); a.x then points to it.
const char* launch_clear_tail_bits(const uint32_t* x, const ConvShape& s, uint32_t* out, cudaStream_t stream);
const char* launch_pack_signs(const PackArgs& p, int dtype, cudaStream_t stream);

// Register-only 1-bit mma.sync (AND/POPC) throughput kernel: blocks x threads threads, each warp
// issuing iters * kMmaPeakIlp independent m16n8k256 instructions.  out: one int per thread.
constexpr int kMmaPeakIlp = 8;
const char* launch_mma_peak(int32_t* out, int blocks, int threads, int iters, cudaStream_t stream);

// One mma.m16n8k256 .b1 .and.popc by one warp on fragments read from device memory.
const char* launch_mma_single(const uint32_t* a, const uint32_t* b, const int32_t* c, int32_t* d, cudaStream_t stream);

}  // namespace bnas_cuda
