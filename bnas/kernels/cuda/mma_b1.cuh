// The one hardware instruction of the XNOR kernels:
//   mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc  d, a, b, c
// computes D[16x8] = C + A[16x256] (AND, popcount) B[256x8], i.e.
//   D[r][n] = C[r][n] + popc(A[r][0:256] & B[0:256][n]).
//
// Fragment layouts, from the PTX ISA, section "Matrix Fragments for mma.m16n8k256"
// (9.7.14.5.13 in the warp-level "Multiply-Accumulate Instruction: mma" chapter, PTX ISA 8.x / 9.x;
// figures "MMA .m16n8k256 fragment layout for matrix A/B/C with .b1 type").  With
// groupID = laneid >> 2 and threadID_in_group (tig) = laneid % 4:
//   A: four .b32 registers a[0..3], element i (bit i & 31 of register i / 32):
//        row = groupID        for i in [0,32) or [64,96)     (registers 0 and 2)
//              groupID + 8    otherwise                       (registers 1 and 3)
//        col = tig*32 + (i & 31)          for i < 64          (registers 0 and 1)
//              tig*32 + (i & 31) + 128    for i >= 64         (registers 2 and 3)
//      (some renderings of the ISA print "tig*32 + i" for i < 64; only "i & 0x1F" makes the
//       32 lanes x 128 bits cover the 16x256 tile exactly once, and it matches m16n8k128.)
//   B: two .b32 registers b[0..1], element i:
//        row (k) = tig*32 + (i & 31) + 128*(i >= 32),   col = groupID
//   C/D: four .s32 registers c[0..3]:
//        row = groupID + 8*(i >= 2),   col = tig*2 + (i & 1)
// Bit j of a .b32 register holds the element with (i & 31) == j (elements are numbered low to
// high).  Since the instruction sums over k, any permutation of k applied to A and B alike
// leaves D unchanged.  The conv kernel loads A and B with ldmatrix.x4 straight into this layout
// (a_ldsm_word / b_ldsm_word in xnor_conv.cuh), no permutation.
#pragma once

#include "common.cuh"

namespace bnas_cuda {

constexpr int kMmaM = 16;
constexpr int kMmaN = 8;
constexpr int kMmaK = 256;   // bits
constexpr int kMmaKWords = kMmaK / 32;

// ---- the layout as functions (used by the host model and by the tests through the emulator)
BNAS_HD int mma_a_row(int lane, int reg) { return (lane >> 2) + 8 * (reg & 1); }
// k index of bit 0 of A register `reg`
BNAS_HD int mma_a_k0(int lane, int reg) { return (lane & 3) * 32 + 128 * (reg >> 1); }
BNAS_HD int mma_b_col(int lane, int /*reg*/) { return lane >> 2; }
BNAS_HD int mma_b_k0(int lane, int reg) { return (lane & 3) * 32 + 128 * reg; }
BNAS_HD int mma_c_row(int lane, int reg) { return (lane >> 2) + 8 * (reg >> 1); }
BNAS_HD int mma_c_col(int lane, int reg) { return (lane & 3) * 2 + (reg & 1); }

#ifndef __CUDACC__
// Exact software model of the warp-wide instruction.  a[lane][0..3], b[lane][0..1] and
// c[lane][0..3] are the registers of all 32 lanes; d receives the result registers.
// Built from the layout above only: gather the 16x256 A and 256x8 B tiles as 8 words per
// row/column, AND-popcount, scatter into the C/D layout.
inline void mma_m16n8k256_b1_and_popc_model(const uint32_t a[32][4], const uint32_t b[32][2],
                                            const int32_t c[32][4], int32_t d[32][4]) {
  uint32_t A[kMmaM][kMmaKWords];
  uint32_t B[kMmaN][kMmaKWords];
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < 4; ++reg)
      A[mma_a_row(lane, reg)][mma_a_k0(lane, reg) / 32] = a[lane][reg];
    for (int reg = 0; reg < 2; ++reg)
      B[mma_b_col(lane, reg)][mma_b_k0(lane, reg) / 32] = b[lane][reg];
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int reg = 0; reg < 4; ++reg) {
      const int r = mma_c_row(lane, reg), n = mma_c_col(lane, reg);
      int32_t acc = c[lane][reg];
      for (int w = 0; w < kMmaKWords; ++w) acc += popc32(A[r][w] & B[n][w]);
      d[lane][reg] = acc;
    }
  }
}
#endif

#ifdef __CUDACC__
// The instruction itself (sm_80+).  c is read and overwritten with d.
BNAS_DEVICE void mma_m16n8k256_b1_and_popc(int32_t c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  // Compiled for an architecture without 1-bit mma.sync.and.popc: never launched (the host
  // launcher refuses devices below sm_80), trap loudly if it ever is.
  __trap();
#endif
}
#endif

}  // namespace bnas_cuda
