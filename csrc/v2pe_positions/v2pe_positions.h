#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace ie {
namespace v2pe {

// Shared argument checks of the CPU and CUDA entry points.
void check_args(const at::Tensor& is_visual, const at::Tensor& cu_seqlens, const c10::optional<at::Tensor>& delta_per_image,
                double delta_scalar);

// Throws c10::Error unless delta_per_image (when given) has one entry per image.
void check_delta_count(const c10::optional<at::Tensor>& delta_per_image, int64_t num_images);

at::Tensor v2pe_positions_cpu(const at::Tensor& is_visual, const at::Tensor& cu_seqlens,
                              const c10::optional<at::Tensor>& delta_per_image, double delta_scalar);
at::Tensor v2pe_positions_cuda(const at::Tensor& is_visual, const at::Tensor& cu_seqlens,
                               const c10::optional<at::Tensor>& delta_per_image, double delta_scalar);

}  // namespace v2pe
}  // namespace ie
