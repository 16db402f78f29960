// CUDA kernel of apply_rotary.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "rotary/rotary.h"
#include "rotary/rotary_math.h"

namespace ie {
namespace rotary {
namespace {

// One block per token: its cosines and sines are computed once into shared memory (as the CPU kernel keeps
// them per token), then the threads stride over the (head, vector of pairs) of the token and the
// pass-through dims beyond rotary_dim. Each thread loads its first pairs before it reads the position and
// builds the table, so the two memory latencies overlap instead of following each other (the launch gives
// most threads one vector of pairs: all of a token's data is in flight at once).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void rotary_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, const float* __restrict__ positions,
                              const float* __restrict__ inv_freq, int64_t tokens, int heads, int64_t head_dim, int half,
                              bool inverse) {
  extern __shared__ __align__(16) unsigned char shared[];
  acc_t* cos_a = reinterpret_cast<acc_t*>(shared);
  acc_t* sin_a = cos_a + half;
  const int64_t t = blockIdx.x;
  if (t >= tokens) return;  // the whole block returns: no thread misses the barrier below
  const int vectors = half / VEC, work = heads * vectors;
  const int first = threadIdx.x;
  PairVectors<scalar_t, VEC> pairs;
  if (first < work) pairs = load_pairs<scalar_t, VEC>(src, offset(t, first / vectors, 0, heads, head_dim), (first % vectors) * VEC, half);
  const float position = positions[t];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float sin_f, cos_f;
    sincosf(angle(position, inv_freq[i]), &sin_f, &cos_f);
    cos_a[i] = static_cast<acc_t>(cos_f);
    sin_a[i] = static_cast<acc_t>(sin_f);
  }
  __syncthreads();
  for (int k = first; k < work; k += blockDim.x) {
    const int64_t head_offset = offset(t, k / vectors, 0, heads, head_dim);
    const int i0 = (k % vectors) * VEC;
    if (k != first) pairs = load_pairs<scalar_t, VEC>(src, head_offset, i0, half);
    rotate_store_pairs<scalar_t, acc_t, VEC>(pairs, dst, head_offset, i0, half, cos_a, sin_a, inverse);
  }
  const int64_t rest = head_dim - 2 * half;
  for (int64_t k = threadIdx.x; k < heads * rest; k += blockDim.x) {
    const int64_t o = offset(t, k / rest, 2 * half + k % rest, heads, head_dim);
    dst[o] = src[o];
  }
}

}  // namespace

at::Tensor rotary_cuda(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq, bool inverse) {
  check_args(x, positions, inv_freq);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t tokens = x.size(0), heads = x.size(1), head_dim = x.size(2), half = inv_freq.size(0);
  if (x.numel() == 0) return out;
  TORCH_CHECK(tokens <= INT32_MAX, "too many tokens for one launch");
  TORCH_CHECK(heads * head_dim <= INT32_MAX, "too many heads x head dims for one token");
  const bool vectorised = can_vectorise(head_dim, half, x.element_size(), x.data_ptr(), out.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const size_t table_bytes = 2 * static_cast<size_t>(half) * sizeof(acc_t);
    TORCH_CHECK(table_bytes <= 48 * 1024, "rotary_dim too large for the kernel's cos/sin table (", half, " pairs)");
    dispatch_vec<scalar_t>(vectorised, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int64_t work = std::max<int64_t>(heads * (half / VEC), heads * (head_dim - 2 * half));
      const int threads = warp_threads(work, 512);
      rotary_kernel<scalar_t, acc_t, VEC><<<static_cast<unsigned>(tokens), threads, table_bytes, at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), positions.data_ptr<float>(), inv_freq.data_ptr<float>(), tokens,
          static_cast<int>(heads), head_dim, static_cast<int>(half), inverse);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace rotary
}  // namespace ie

TORCH_LIBRARY_IMPL(internvl3_engine_C, CUDA, m) { m.impl("rotary", &ie::rotary::rotary_cuda); }
