#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ie {
namespace scatter_visual {

// Shared argument checks of the CPU and CUDA entry points.
void check_forward_args(const at::Tensor& text, const at::Tensor& visual, const at::Tensor& is_visual,
                        const at::Tensor& visual_before);
void check_backward_args(const at::Tensor& grad, const at::Tensor& is_visual, const at::Tensor& visual_before,
                         int64_t num_visual);

at::Tensor scatter_visual_cpu(const at::Tensor& text, const at::Tensor& visual, const at::Tensor& is_visual,
                              const at::Tensor& visual_before);
std::tuple<at::Tensor, at::Tensor> scatter_visual_backward_cpu(const at::Tensor& grad, const at::Tensor& is_visual,
                                                               const at::Tensor& visual_before, int64_t num_visual);
at::Tensor scatter_visual_cuda(const at::Tensor& text, const at::Tensor& visual, const at::Tensor& is_visual,
                               const at::Tensor& visual_before);
std::tuple<at::Tensor, at::Tensor> scatter_visual_backward_cuda(const at::Tensor& grad, const at::Tensor& is_visual,
                                                                const at::Tensor& visual_before, int64_t num_visual);

}  // namespace scatter_visual
}  // namespace ie
