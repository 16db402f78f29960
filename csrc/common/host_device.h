// Shared by the C++ CPU kernels and the CUDA kernels: index math written once, compiled for both.
#pragma once

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

}  // namespace ie
