// CUDA build of the XNOR convolution and the fused sign-packing kernel.  The kernel bodies
// live in xnor_conv.cuh (shared with the host warp emulator); this file instantiates them
// with DeviceCtx, picks the tile configuration and launches.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "device_ctx.cuh"
#include "launch.h"
#include "tiles.h"
#include "xnor_conv.cuh"

namespace bnas_cuda {

template <class Tile>
__global__ void __launch_bounds__(Tile::THREADS) xnor_conv_kernel(ConvArgs a) {
  extern __shared__ __align__(16) uint8_t bnas_smem[];
  DeviceCtx ctx{bnas_smem};
  xnor_conv_block<Tile>(a, ctx);
}

// Element-wise kernels (pack, tap sums, tail clearing): 256 threads, grid-stride loops over
// at most 65535*8 blocks.
constexpr int kElementwiseThreads = 256;
inline unsigned grid_stride_blocks(int64_t total) {
  const int64_t want = (total + kElementwiseThreads - 1) / kElementwiseThreads;
  return (unsigned)(want < 65535 * 8 ? want : 65535 * 8);
}

template <class T>
__global__ void __launch_bounds__(kElementwiseThreads) pack_signs_kernel(PackArgs p) {
  DeviceCtx ctx{nullptr};
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.total; i += stride)
    pack_signs_word<T>(p, i, ctx);
}

__global__ void __launch_bounds__(kElementwiseThreads) tap_sums_kernel(TapSumArgs p) {
  DeviceCtx ctx{nullptr};
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.total; i += stride) conv_tap_sum(p, i, ctx);
}

__global__ void __launch_bounds__(kElementwiseThreads)
    clear_tail_bits_kernel(const uint32_t* in, uint32_t* out, int Wg, uint32_t tail, int64_t total) {
  DeviceCtx ctx{nullptr};
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride)
    clear_tail_bits_word(in, out, Wg, tail, i, ctx);
}

namespace {

template <class Tile>
const char* launch_tile(const ConvArgs& a, cudaStream_t stream) {
  const ConvShape& s = a.s;
  const ConvSmem L = conv_smem_layout<Tile>(s.T);
  const int nblk = ceil_div(s.Kg, Tile::BN);
  const long long gy = (long long)s.G * nblk;
  if (gy > 65535) return "xnor_conv: too many (group, channel-tile) blocks for one launch (grid.y > 65535)";
  const dim3 grid(ceil_div(s.M, Tile::BM), (unsigned)gy, (unsigned)a.splits);
  // opt in to more than 48 KB of dynamic shared memory, once per device and size
  constexpr int kMaxDevices = 64;
  static int configured[kMaxDevices] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (dev >= kMaxDevices || configured[dev] < L.total) {
    e = cudaFuncSetAttribute(xnor_conv_kernel<Tile>, cudaFuncAttributeMaxDynamicSharedMemorySize, L.total);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    if (dev < kMaxDevices) configured[dev] = L.total;
  }
  xnor_conv_kernel<Tile><<<grid, Tile::THREADS, L.total, stream>>>(a);
  e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <template <int> class TileOf>
const char* launch_vw(const ConvArgs& a, int vw, cudaStream_t stream) {
  switch (vw) {
    case 4: return launch_tile<TileOf<4>>(a, stream);
    case 2: return launch_tile<TileOf<2>>(a, stream);
    default: return launch_tile<TileOf<1>>(a, stream);
  }
}

}  // namespace

const char* launch_xnor_conv(const ConvArgs& a, cudaStream_t stream) {
  int dev = 0, major = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (major < 8) return "xnor_conv: 1-bit mma.sync .and.popc needs compute capability 8.0 or newer";
  if (a.tap_sums == nullptr) return "xnor_conv: the weights' tap sums are missing (launch_tap_sums)";
  if (a.out_packed && packed_output_needs_zeroing(a.s)) {
    e = cudaMemsetAsync(a.out_packed, 0, sizeof(uint32_t) * (size_t)a.s.M * a.s.out_GW, stream);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  if (a.splits < 1 || a.splits > kMaxSplits || (a.splits > 1 && !a.split_acc))
    return "xnor_conv: split-K needs 1..8 slices and a zeroed workspace (set_split_workspace)";
  const int vw = copy_width(a.s, a.x, a.w);
  if (a.splits == 1 && use_large_tile(a.s, sms)) return launch_vw<LargeTile>(a, vw, stream);
  return launch_vw<SmallTile>(a, vw, stream);
}

const char* choose_conv_splits(const ConvShape& s, int* splits) {
  int dev = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  *splits = conv_splits(s, sms);
  return nullptr;
}

const char* launch_tap_sums(const uint32_t* w, const ConvShape& s, int32_t* out, cudaStream_t stream) {
  TapSumArgs p{w, out, s.T, s.Wg, s.Cg, (int64_t)s.K * s.T};
  tap_sums_kernel<<<grid_stride_blocks(p.total), kElementwiseThreads, 0, stream>>>(p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

const char* launch_clear_tail_bits(const uint32_t* x, const ConvShape& s, uint32_t* out, cudaStream_t stream) {
  const int64_t total = (int64_t)s.N * s.H * s.W * s.GW;
  clear_tail_bits_kernel<<<grid_stride_blocks(total), kElementwiseThreads, 0, stream>>>(x, out, s.Wg,
                                                                                       tail_word_mask(s.Cg), total);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

const char* launch_pack_signs(const PackArgs& p, int dtype, cudaStream_t stream) {
  const unsigned blocks = grid_stride_blocks(p.total);
  constexpr int threads = kElementwiseThreads;
  switch (dtype) {
    case kPackFloat32: pack_signs_kernel<float><<<blocks, threads, 0, stream>>>(p); break;
    case kPackFloat16: pack_signs_kernel<__half><<<blocks, threads, 0, stream>>>(p); break;
    case kPackBFloat16: pack_signs_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(p); break;
    default: return "pack_signs: dtype must be float32, float16 or bfloat16";
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace bnas_cuda
