#pragma once

#include <ATen/ATen.h>

namespace ie {
namespace loss_weights {

// Shared argument checks of the CPU and CUDA entry points.
void check_args(const at::Tensor& labels, const at::Tensor& cu_seqlens, int64_t mode);

at::Tensor loss_weights_cpu(const at::Tensor& labels, const at::Tensor& cu_seqlens, int64_t mode, int64_t ignore_index);
at::Tensor loss_weights_cuda(const at::Tensor& labels, const at::Tensor& cu_seqlens, int64_t mode, int64_t ignore_index);

}  // namespace loss_weights
}  // namespace ie
