// CUDA kernel of v2pe_position_ids: the CPU kernel's two passes with one thread per segment (a segment's
// positions are a sequential scan: each image's end position depends on the ones before it), the counts'
// exclusive prefix sum by at::cumsum in between. Runs once per batch, on the token ids, not per layer.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "v2pe_positions/v2pe_positions.h"
#include "v2pe_positions/v2pe_positions_math.h"

namespace ie {
namespace v2pe {
namespace {

constexpr int kThreads = 128;

__global__ void count_images_kernel(const bool* __restrict__ is_visual, const int32_t* __restrict__ cu_seqlens, int64_t tokens,
                                    int64_t segments, int64_t* __restrict__ counts) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= segments) return;
  int64_t begin, end;
  segment_bounds(cu_seqlens, b, tokens, begin, end);
  counts[b] = count_images(is_visual, begin, end);
}

// `last_images[b]` is the inclusive prefix sum of the counts: segment b's first image is
// last_images[b] - counts[b].
__global__ void write_positions_kernel(const bool* __restrict__ is_visual, const int32_t* __restrict__ cu_seqlens, int64_t tokens,
                                       int64_t segments, const int64_t* __restrict__ counts,
                                       const int64_t* __restrict__ last_images, const float* __restrict__ deltas,
                                       int64_t num_deltas, double delta_scalar, float* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= segments) return;
  int64_t begin, end;
  segment_bounds(cu_seqlens, b, tokens, begin, end);
  write_segment_positions(is_visual, begin, end, last_images[b] - counts[b], deltas, num_deltas, delta_scalar, out);
}

}  // namespace

at::Tensor v2pe_positions_cuda(const at::Tensor& is_visual, const at::Tensor& cu_seqlens,
                               const c10::optional<at::Tensor>& delta_per_image, double delta_scalar) {
  check_args(is_visual, cu_seqlens, delta_per_image, delta_scalar);
  const c10::cuda::CUDAGuard guard(is_visual.device());
  const int64_t tokens = is_visual.size(0), segments = cu_seqlens.size(0) - 1;
  // Zero-filled: tokens outside every segment (cu_seqlens the op's validation rejects) get a defined value.
  at::Tensor out = at::zeros({tokens}, is_visual.options().dtype(at::kFloat));
  if (segments == 0) {
    check_delta_count(delta_per_image, 0);
    return out;
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>(ceil_div(segments, kThreads));
  at::Tensor counts = at::empty({segments}, is_visual.options().dtype(at::kLong));
  count_images_kernel<<<blocks, kThreads, 0, stream>>>(is_visual.data_ptr<bool>(), cu_seqlens.data_ptr<int32_t>(), tokens,
                                                       segments, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor last_images = at::cumsum(counts, 0);
  // Only a per-image delta needs the image count on the host (one sync, for the check).
  if (delta_per_image.has_value()) check_delta_count(delta_per_image, last_images[segments - 1].item<int64_t>());
  const float* deltas = delta_per_image.has_value() ? delta_per_image->data_ptr<float>() : nullptr;
  const int64_t num_deltas = delta_per_image.has_value() ? delta_per_image->size(0) : 0;
  write_positions_kernel<<<blocks, kThreads, 0, stream>>>(is_visual.data_ptr<bool>(), cu_seqlens.data_ptr<int32_t>(), tokens,
                                                          segments, counts.data_ptr<int64_t>(), last_images.data_ptr<int64_t>(),
                                                          deltas, num_deltas, delta_scalar, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace v2pe
}  // namespace ie

TORCH_LIBRARY_IMPL(internvl3_engine_C, CUDA, m) { m.impl("v2pe_positions", &ie::v2pe::v2pe_positions_cuda); }
