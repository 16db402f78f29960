#pragma once

#include <ATen/ATen.h>

namespace ie {
namespace rotary {

// Shared argument checks of the CPU and CUDA entry points.
void check_args(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq);

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq, bool inverse);
at::Tensor rotary_cuda(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq, bool inverse);

}  // namespace rotary
}  // namespace ie
