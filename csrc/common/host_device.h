// Shared by the C++ CPU kernels and the CUDA kernels: index math written once, compiled for both.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define IE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IE_HOST_DEVICE inline
#endif

namespace ie {

// Number of blocks of `block` elements covering `n` elements.
IE_HOST_DEVICE int64_t ceil_div(int64_t n, int64_t block) { return (n + block - 1) / block; }

}  // namespace ie
