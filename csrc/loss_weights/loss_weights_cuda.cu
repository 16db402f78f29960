// CUDA kernel of loss_weights: one block per segment; the block counts the segment's supervised tokens
// (a block reduction), then writes every token's weight.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "common/checks.h"
#include "loss_weights/loss_weights.h"
#include "loss_weights/loss_weights_math.h"

namespace ie {
namespace loss_weights {
namespace {

constexpr int kThreads = 256;

template <typename label_t>
__global__ void loss_weights_kernel(const label_t* __restrict__ labels, const int32_t* __restrict__ cu_seqlens,
                                    float* __restrict__ weights, int64_t tokens, int64_t mode, int64_t ignore_index) {
  using BlockReduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  __shared__ int64_t segment_count;
  const int64_t s = blockIdx.x;
  // Bound-checked against the label count: values are checked by the op, not trusted here.
  const int64_t start = min(max(static_cast<int64_t>(cu_seqlens[s]), int64_t{0}), tokens);
  const int64_t stop = min(max(static_cast<int64_t>(cu_seqlens[s + 1]), start), tokens);
  int64_t count = 0;
  for (int64_t t = start + threadIdx.x; t < stop; t += kThreads) count += supervised(labels[t], ignore_index);
  count = BlockReduce(reduce_storage).Sum(count);
  if (threadIdx.x == 0) segment_count = count;
  __syncthreads();
  if (segment_count == 0) return;  // the weights stay 0
  const float w = sample_weight(segment_count, mode);
  for (int64_t t = start + threadIdx.x; t < stop; t += kThreads) weights[t] = supervised(labels[t], ignore_index) ? w : 0.0f;
}

}  // namespace

at::Tensor loss_weights_cuda(const at::Tensor& labels, const at::Tensor& cu_seqlens, int64_t mode, int64_t ignore_index) {
  check_args(labels, cu_seqlens, mode);
  const c10::cuda::CUDAGuard guard(labels.device());
  const int64_t tokens = labels.size(0), segments = cu_seqlens.size(0) - 1;
  // Zeros: tokens of segments without supervised tokens are never written.
  at::Tensor weights = at::zeros({tokens}, labels.options().dtype(at::kFloat));
  if (tokens == 0 || segments == 0) return weights;
  TORCH_CHECK(segments <= INT32_MAX, "too many segments for one launch");
  AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "loss_weights_cuda", [&] {
    loss_weights_kernel<index_t><<<static_cast<unsigned>(segments), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        labels.data_ptr<index_t>(), cu_seqlens.data_ptr<int32_t>(), weights.data_ptr<float>(), tokens, mode, ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return weights;
}

}  // namespace loss_weights
}  // namespace ie

TORCH_LIBRARY_IMPL(internvl3_engine_C, CUDA, m) { m.impl("loss_weights", &ie::loss_weights::loss_weights_cuda); }
