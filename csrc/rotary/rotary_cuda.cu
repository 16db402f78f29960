// CUDA kernel of apply_rotary: one block per token; threads stride over (head, pair) and the
// pass-through dims beyond rotary_dim.
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

template <typename scalar_t, typename acc_t>
__global__ void rotary_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, const float* __restrict__ positions,
                              const float* __restrict__ inv_freq, int64_t tokens, int64_t heads, int64_t head_dim,
                              int64_t half, bool inverse) {
  const int64_t t = blockIdx.x;
  if (t >= tokens) return;
  const float position = positions[t];
  for (int64_t k = threadIdx.x; k < heads * half; k += blockDim.x) {
    const int64_t h = k / half, i = k % half;
    float sin_f, cos_f;
    sincosf(angle(position, inv_freq[i]), &sin_f, &cos_f);
    const int64_t o1 = offset(t, h, i, heads, head_dim), o2 = offset(t, h, i + half, heads, head_dim);
    acc_t y1, y2;
    rotate<acc_t>(static_cast<acc_t>(src[o1]), static_cast<acc_t>(src[o2]), cos_f, sin_f, inverse, y1, y2);
    dst[o1] = static_cast<scalar_t>(y1);
    dst[o2] = static_cast<scalar_t>(y2);
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
  const int threads = static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, ceil_div(heads * half, 32) * 32)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rotary_kernel<scalar_t, acc_t><<<static_cast<unsigned>(tokens), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), positions.data_ptr<float>(), inv_freq.data_ptr<float>(), tokens,
        heads, head_dim, half, inverse);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace rotary
}  // namespace ie

TORCH_LIBRARY_IMPL(internvl3_engine_C, CUDA, m) { m.impl("rotary", &ie::rotary::rotary_cuda); }
