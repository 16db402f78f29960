// CUDA kernels of scatter_visual: one block per token row; the row is copied in the widest chunks
// (up to 16 bytes) that its byte size and the base addresses allow, so bf16 rows of the usual LLM widths
// move as 16-byte vectors. The copy is dtype-blind (pure data movement: results equal other backends bit for bit).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/checks.h"
#include "common/vector.h"
#include "scatter_visual/scatter_visual.h"
#include "scatter_visual/scatter_visual_math.h"

namespace ie {
namespace scatter_visual {
namespace {

template <typename chunk_t>
__global__ void scatter_visual_kernel(const chunk_t* __restrict__ text, const chunk_t* __restrict__ visual,
                                      chunk_t* __restrict__ out, const bool* __restrict__ is_visual,
                                      const int64_t* __restrict__ visual_before, int64_t num_visual, int64_t row_chunks) {
  const int64_t t = blockIdx.x;
  const int64_t j = source_row(is_visual[t], visual_before[t], num_visual);
  const chunk_t* __restrict__ src = j >= 0 ? visual + j * row_chunks : text + t * row_chunks;
  chunk_t* __restrict__ dst = out + t * row_chunks;
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < row_chunks; k += blockDim.x) dst[k] = src[k];
}

template <typename chunk_t>
__global__ void scatter_visual_backward_kernel(const chunk_t* __restrict__ grad, chunk_t* __restrict__ grad_text,
                                               chunk_t* __restrict__ grad_visual, const bool* __restrict__ is_visual,
                                               const int64_t* __restrict__ visual_before, int64_t num_visual,
                                               int64_t row_chunks) {
  const int64_t t = blockIdx.x;
  const int64_t j = source_row(is_visual[t], visual_before[t], num_visual);
  const chunk_t* __restrict__ src = grad + t * row_chunks;
  chunk_t* __restrict__ text_row = grad_text + t * row_chunks;
  if (j >= 0) {
    chunk_t* __restrict__ visual_row = grad_visual + j * row_chunks;
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < row_chunks; k += blockDim.x) {
      visual_row[k] = src[k];
      text_row[k] = chunk_t{};  // all-zero bytes are +0.0 in every float dtype
    }
  } else {
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < row_chunks; k += blockDim.x) text_row[k] = src[k];
  }
}

}  // namespace

at::Tensor scatter_visual_cuda(const at::Tensor& text, const at::Tensor& visual, const at::Tensor& is_visual,
                               const at::Tensor& visual_before) {
  check_forward_args(text, visual, is_visual, visual_before);
  const c10::cuda::CUDAGuard guard(text.device());
  at::Tensor out = at::empty_like(text);
  const int64_t tokens = text.size(0);
  const int64_t row_bytes = text.size(1) * static_cast<int64_t>(text.element_size());
  if (tokens == 0 || row_bytes == 0) return out;
  TORCH_CHECK(tokens <= INT32_MAX, "too many tokens for one launch");
  const int64_t chunk = widest_word(row_bytes, {text.data_ptr(), visual.data_ptr(), out.data_ptr()});
  const int64_t row_chunks = row_bytes / chunk;
  with_word_type(chunk, [&](auto tag) {
    using chunk_t = decltype(tag);
    scatter_visual_kernel<chunk_t><<<static_cast<unsigned>(tokens), warp_threads(row_chunks, 256), 0,
                                     at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const chunk_t*>(text.data_ptr()), static_cast<const chunk_t*>(visual.data_ptr()),
        static_cast<chunk_t*>(out.data_ptr()), is_visual.data_ptr<bool>(), visual_before.data_ptr<int64_t>(),
        visual.size(0), row_chunks);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> scatter_visual_backward_cuda(const at::Tensor& grad, const at::Tensor& is_visual,
                                                                const at::Tensor& visual_before, int64_t num_visual) {
  check_backward_args(grad, is_visual, visual_before, num_visual);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_text = at::empty_like(grad);
  // Every row of grad_visual is written exactly once when the visual count equals num_visual (the op checks).
  at::Tensor grad_visual = at::empty({num_visual, grad.size(1)}, grad.options());
  const int64_t tokens = grad.size(0);
  const int64_t row_bytes = grad.size(1) * static_cast<int64_t>(grad.element_size());
  if (tokens == 0 || row_bytes == 0) return {grad_text, grad_visual};
  TORCH_CHECK(tokens <= INT32_MAX, "too many tokens for one launch");
  const int64_t chunk = widest_word(row_bytes, {grad.data_ptr(), grad_text.data_ptr(), grad_visual.data_ptr()});
  const int64_t row_chunks = row_bytes / chunk;
  with_word_type(chunk, [&](auto tag) {
    using chunk_t = decltype(tag);
    scatter_visual_backward_kernel<chunk_t><<<static_cast<unsigned>(tokens), warp_threads(row_chunks, 256), 0,
                                              at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const chunk_t*>(grad.data_ptr()), static_cast<chunk_t*>(grad_text.data_ptr()),
        static_cast<chunk_t*>(grad_visual.data_ptr()), is_visual.data_ptr<bool>(), visual_before.data_ptr<int64_t>(),
        num_visual, row_chunks);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_text, grad_visual};
}

}  // namespace scatter_visual
}  // namespace ie

TORCH_LIBRARY_IMPL(internvl3_engine_C, CUDA, m) {
  m.impl("scatter_visual", &ie::scatter_visual::scatter_visual_cuda);
  m.impl("scatter_visual_backward", &ie::scatter_visual::scatter_visual_backward_cuda);
}
