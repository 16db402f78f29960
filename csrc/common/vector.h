// Vector (16-byte) loads and stores shared by the CPU and CUDA kernels: a Pack of VEC elements is moved as
// one word, which coalesces and vectorises on the GPU; the host code runs the same element loops.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/host_device.h"

namespace ie {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
IE_HOST_DEVICE Pack<T, VEC> load_pack(const T* pointer) {
  return *reinterpret_cast<const Pack<T, VEC>*>(pointer);
}

template <typename T, int VEC>
IE_HOST_DEVICE void store_pack(T* pointer, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(pointer) = pack;
}

inline bool aligned_to(const void* pointer, int64_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

// Calls body(std::integral_constant<int, VEC>) with 16-byte vectors (VEC = 16 / sizeof(scalar_t)) when
// `vectorised`, else with single elements.
template <typename scalar_t, typename Body>
void dispatch_vec(bool vectorised, const Body& body) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (vectorised) return body(std::integral_constant<int, kVec>{});
  return body(std::integral_constant<int, 1>{});
}

}  // namespace ie
