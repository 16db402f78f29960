// Vector (16-byte) loads and stores shared by the CPU and CUDA kernels: a Pack of VEC elements is moved as
// one word, which coalesces and vectorises on the GPU; the host code runs the same element loops.
#pragma once

#include <cstdint>
#include <initializer_list>
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

// On the device a pack of whole 16-byte words is stored with one 16-byte store instruction per word
// (__stwb: a plain write-back store). A pack built element by element (converted results) otherwise
// reaches the compiler as element stores, which it merges back only in part (seen: bf16 results of an
// unrolled loop stored as four 4-byte stores instead of one 16-byte store).
template <typename T, int VEC>
IE_HOST_DEVICE void store_pack(T* pointer, const Pack<T, VEC>& pack) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(Pack<T, VEC>) % sizeof(uint4) == 0) {
    constexpr int kWords = sizeof(Pack<T, VEC>) / sizeof(uint4);
    uint4 words[kWords];
    memcpy(words, &pack, sizeof(words));
    IE_UNROLL
    for (int i = 0; i < kWords; ++i) __stwb(reinterpret_cast<uint4*>(pointer) + i, words[i]);
    return;
  }
#endif
  *reinterpret_cast<Pack<T, VEC>*>(pointer) = pack;
}

inline bool aligned_to(const void* pointer, int64_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

// Whether 16-byte vectors (16 / element_size elements) tile every run of `run_lengths` elements and every
// pointer starts on a 16-byte boundary: the condition for a kernel to move its data as whole vectors.
inline bool vectors_fit(int64_t element_size, std::initializer_list<int64_t> run_lengths,
                        std::initializer_list<const void*> pointers) {
  const int64_t vec = 16 / element_size;
  for (const int64_t length : run_lengths) {
    if (length % vec != 0) return false;
  }
  for (const void* pointer : pointers) {
    if (!aligned_to(pointer, 16)) return false;
  }
  return true;
}

// Calls body(std::integral_constant<int, VEC>) with 16-byte vectors (VEC = 16 / sizeof(scalar_t)) when
// `vectorised`, else with single elements.
template <typename scalar_t, typename Body>
void dispatch_vec(bool vectorised, const Body& body) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (vectorised) return body(std::integral_constant<int, kVec>{});
  return body(std::integral_constant<int, 1>{});
}

// The widest power-of-two word, at most 16 bytes, that divides `run_bytes` and every pointer's address: the
// word in which a dtype-blind copy of runs of `run_bytes` between those pointers can move its data.
inline int64_t widest_word(int64_t run_bytes, std::initializer_list<const void*> pointers) {
  uint64_t bits = static_cast<uint64_t>(run_bytes);
  for (const void* pointer : pointers) bits |= reinterpret_cast<uintptr_t>(pointer);
  int64_t word = 16;
  while (word > 1 && bits % static_cast<uint64_t>(word) != 0) word /= 2;
  return word;
}

#if defined(__CUDACC__)
// Calls body(word_t{}) with the unsigned type of `bytes` (16, 8, 4, 2 or 1) bytes.
template <typename Body>
void with_word_type(int64_t bytes, const Body& body) {
  switch (bytes) {
    case 16: return body(uint4{});
    case 8: return body(uint2{});
    case 4: return body(uint32_t{});
    case 2: return body(uint16_t{});
    default: return body(uint8_t{});
  }
}
#endif

}  // namespace ie
