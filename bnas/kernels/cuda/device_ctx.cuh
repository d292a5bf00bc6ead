// The device side of the kernel context: thread indices, dynamic shared memory, barriers,
// cp.async and the 1-bit mma, as used by the BNAS_HD kernel bodies of xnor_conv.cuh.
// (The host warp emulator supplies the same interface in emulator.cpp.)
#pragma once

#include <cuda_runtime.h>

#include "mma_b1.cuh"

namespace bnas_cuda {

struct DeviceCtx {
  uint8_t* sm;

  __device__ __forceinline__ int tid() const { return threadIdx.x; }
  __device__ __forceinline__ int block_x() const { return blockIdx.x; }
  __device__ __forceinline__ int block_y() const { return blockIdx.y; }
  __device__ __forceinline__ int block_z() const { return blockIdx.z; }
  __device__ __forceinline__ uint8_t* smem() const { return sm; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }

  __device__ __forceinline__ void mma(int32_t c[4], const uint32_t a[4], const uint32_t b[2]) const {
    mma_m16n8k256_b1_and_popc(c, a, b);
  }

  // ldmatrix.x4: lane l gives the 16-byte row address of row l % 8 of matrix l / 8 and receives
  // word (l % 4) of row (l / 4) of matrix j in r[j] (see a_ldsm_word in xnor_conv.cuh).
  __device__ __forceinline__ void ldsm_x4(uint32_t r[4], const uint32_t* row) const {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
  // the epilogue's sign bits: the 4 lanes of a group OR 8 bits each into a shared word
  __device__ __forceinline__ void atomic_or_shared(uint32_t* p, uint32_t v) const { atomicOr(p, v); }

  // Asynchronous global->shared copy of BYTES (4, 8 or 16); pred == false writes zeros
  // (src-size 0: nothing is read, src only has to be a valid global address).
  template <int BYTES>
  __device__ __forceinline__ void cp_async(void* dst, const void* src, bool pred) const {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async size");
    const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    const int src_size = pred ? BYTES : 0;
    if (BYTES == 16) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(src), "r"(src_size) : "memory");
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(saddr), "l"(src), "n"(BYTES), "r"(src_size)
                   : "memory");
    }
  }
  __device__ __forceinline__ void cp_commit() const { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
  template <int N>
  __device__ __forceinline__ void cp_wait() const {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
  }

  template <class T>
  __device__ __forceinline__ T ld(const T* p) const { return *p; }
  template <class T>
  __device__ __forceinline__ void st(T* p, T v) const { *p = v; }
  __device__ __forceinline__ void atomic_or(uint32_t* p, uint32_t v) const { atomicOr(p, v); }
  // split-K: reductions into global memory, the fence before the arrival count, L2 reads
  __device__ __forceinline__ void red_add(int32_t* p, int32_t v) const { atomicAdd(p, v); }
  __device__ __forceinline__ int atomic_add(int32_t* p, int32_t v) const { return atomicAdd(p, v); }
  __device__ __forceinline__ void fence() const { __threadfence(); }
  __device__ __forceinline__ int32_t ld_l2(const int32_t* p) const { return __ldcg(p); }
};

}  // namespace bnas_cuda
