// The tile configurations and the rules that pick one; shared by the CUDA launcher and the
// host emulator so both run the same instantiations.
#pragma once

#include "xnor_conv.cuh"

namespace bnas_cuda {

// 128x128 block, 2x2 warps of 64x64 (32 mma per 256-bit step per warp): large problems.
template <int VW>
using LargeTile = ConvTile<128, 128, 64, 64, 16, 3, VW>;
// 64x64 block, 2x2 warps of 32x32: more blocks for small problems (batch 1, 7x7 maps).
// (the only one with split-K: conv_splits below)
template <int VW>
using SmallTile = ConvTile<64, 64, 32, 32, 16, 3, VW, true>;

// Widest copy (words) that keeps every chunk inside one tap and aligned in global memory.
inline int copy_width(const ConvShape& s, const void* x, const void* w) {
  const unsigned long long ax = (unsigned long long)x, aw = (unsigned long long)w;
  for (int vw = 4; vw > 1; vw /= 2)
    if (s.Wg % vw == 0 && ax % (4 * vw) == 0 && aw % (4 * vw) == 0) return vw;
  return 1;
}

// Output tiles (blocks of one launch without split-K) of a tile configuration.
template <class Tile>
inline long long output_tiles(const ConvShape& s) {
  return (long long)ceil_div(s.M, Tile::BM) * s.G * ceil_div(s.Kg, Tile::BN);
}

// The large tile when a group's channels fill its 128 columns (narrower groups would leave
// part of every block idle; the small tile wastes nothing there) and it still gives at least
// one block per SM.
inline bool use_large_tile(const ConvShape& s, int sm_count) {
  return s.Kg >= LargeTile<1>::BN && output_tiles<LargeTile<1>>(s) >= sm_count;
}

// Split-K for grids that would leave most SMs idle (batch 1, 7x7 maps): the small tile's
// blocks times `splits` depth slices fill about one wave, each slice at least two stages
// deep, at most 8 slices.  1 = no split.
constexpr int kMinStagesPerSlice = 2, kMaxSplits = 8;
inline int conv_splits(const ConvShape& s, int sm_count) {
  if (use_large_tile(s, sm_count)) return 1;
  const int stages = ceil_div(s.Q, SmallTile<1>::BKW);
  long long splits = sm_count / output_tiles<SmallTile<1>>(s);
  if (splits > stages / kMinStagesPerSlice) splits = stages / kMinStagesPerSlice;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return splits < 2 ? 1 : (int)splits;
}

// Split-K workspace in int32: per small-tile output tile BM*BN sums + BM popc(x) sums, then
// one arrival counter per tile; zeroed before the launch.
constexpr int kSplitTileInts = SmallTile<1>::BM * SmallTile<1>::BN + SmallTile<1>::BM;
inline long long split_workspace_ints(const ConvShape& s) { return output_tiles<SmallTile<1>>(s) * (kSplitTileInts + 1); }
inline void set_split_workspace(ConvArgs& a, int splits, int32_t* ws) {
  a.splits = splits;
  a.split_acc = splits > 1 ? ws : nullptr;
  a.split_count = splits > 1 ? ws + output_tiles<SmallTile<1>>(a.s) * kSplitTileInts : nullptr;
}

// Whether the activations get a copy with the bits past the channel count cleared first.
inline bool activations_need_tail_clearing(const ConvShape& s) { return s.Cg % 32 != 0; }

// Whether some packed-output word gets bits from two blocks (a group or channel-tile boundary
// inside a word): those words are OR-ed into a zeroed output; otherwise every word is stored
// whole by exactly one block (tile widths are multiples of 32) and no zeroing is needed.
inline bool packed_output_needs_zeroing(const ConvShape& s) { return s.Kg % 32 != 0 || s.out_Kg % 32 != 0; }

}  // namespace bnas_cuda
