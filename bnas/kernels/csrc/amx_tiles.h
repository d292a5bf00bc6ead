// Intel AMX (Advanced Matrix Extensions) for the int8 convs: TDPBUSD multiplies a 16 x 64
// tile of unsigned bytes by a 64 x 16 tile of signed bytes into a 16 x 16 tile of int32 sums,
// 16,384 multiply-adds per instruction where AVX-512 VNNI's VPDPBUSD does 64. The sums are the
// same exact integers as VNNI's, so a conv computed either way gives the same result bit for
// bit; AMX only changes how fast they come.
//
// Linux hands out AMX state only to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM, once
// per process, kernel 5.16 or later); without that grant the first tile instruction kills the
// process, so `amx_int8_available` asks before anything uses a tile, and says no when the CPU,
// the compiler's view of it or the kernel lacks AMX. Tile shapes are per thread state that other
// libraries on the same thread (oneDNN) may load too, so every user loads its own configuration
// before its tiles and releases them after.
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace bnas {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: request permission for a state component
constexpr long kXfeatureXtiledata = 18;     // the AMX tile data component

// Whether this CPU and kernel run AMX-INT8 (asked once; the grant lasts for the process).
inline bool amx_int8_hardware() {
  static const bool available = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return false;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return available;
}

// The int8 convs use AMX where amx_int8_hardware() and this switch allow: on by default, off
// with BNAS_AMX=0 in the environment (read once) or set_amx_int8_enabled(false), which the
// benchmarks use to time the VNNI kernels beside the AMX ones in one process.
inline std::atomic<bool>& amx_int8_switch() {
  static std::atomic<bool> enabled{[] {
    const char* env = std::getenv("BNAS_AMX");
    return !(env && std::strcmp(env, "0") == 0);
  }()};
  return enabled;
}
inline bool amx_int8_available() { return amx_int8_switch().load(std::memory_order_relaxed) && amx_int8_hardware(); }

// The LDTILECFG memory operand (palette 1): each tile's rows and bytes per row.
struct alignas(64) AmxTileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0 .. count - 1 as full 16 rows x 64 bytes (C tiles of 16 x 16 int32, A tiles of
// 16 x 64 bytes, B tiles of 16 quads x 16 columns of 4 bytes).
inline AmxTileConfig amx_full_tiles(int count) {
  AmxTileConfig config;
  for (int t = 0; t < count; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  return config;
}

// Loads `config` on this thread for the scope's lifetime and releases the tiles after.
class AmxTileScope {
 public:
  __attribute__((target("amx-tile"))) explicit AmxTileScope(const AmxTileConfig& config) {
    _tile_loadconfig(&config);
  }
  __attribute__((target("amx-tile"))) ~AmxTileScope() { _tile_release(); }
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;
};

}  // namespace bnas
