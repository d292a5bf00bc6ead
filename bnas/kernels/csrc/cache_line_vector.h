// Buffers that start on a 64-byte cache line. An AMX tile row or an AVX-512 vector read from
// a buffer std::vector's default allocator placed 16 bytes into a line straddles two lines on
// every row, and where malloc put the buffer then decides the kernel's speed from process to
// process (the 224x224 int8 stem took 0.26 ms in some processes and 0.36-0.42 ms in others).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace bnas {

constexpr std::size_t kCacheLine = 64;

template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine)));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(kCacheLine)); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept {
    return true;
  }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const noexcept {
    return false;
  }
};

// A std::vector whose data() is 64-byte aligned.
template <class T>
using CacheLineVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace bnas
