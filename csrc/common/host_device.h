// Shared by the C++ CPU kernels and the CUDA kernels: index math written once, compiled for both.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define IE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IE_HOST_DEVICE inline
#endif

// Full unrolling of a short loop with a compile-time trip count in code compiled for both: on the device
// a loop over a register array must unroll, or the array goes to local memory. (nvcc takes its own pragma
// in both of its passes; GCC has its own spelling.)
#if defined(__CUDACC__)
#define IE_UNROLL _Pragma("unroll")
#else
#define IE_UNROLL _Pragma("GCC unroll 16")
#endif

namespace ie {

// Number of blocks of `block` elements covering `n` elements.
IE_HOST_DEVICE int64_t ceil_div(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Threads of a CUDA block whose threads take one of `work` items each: whole warps, at least one, at most
// `max_threads` (the kernels stride over the items beyond).
inline int warp_threads(int64_t work, int64_t max_threads) {
  return static_cast<int>(std::min<int64_t>(max_threads, std::max<int64_t>(32, ceil_div(work, 32) * 32)));
}

}  // namespace ie
