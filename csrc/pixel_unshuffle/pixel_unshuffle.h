#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "pixel_unshuffle/pixel_unshuffle_math.h"

namespace ie {
namespace pixel_unshuffle {

// Shared argument checks and set-up of the CPU and CUDA entry points.
// The geometry of pixel_unshuffle's input x [N, h, w, C], or of its output's gradient grad [N, h/r, w/r, r*r*C],
// after checking the tensor (4-D, contiguous, divisible by factor r >= 1).
Geometry input_geometry(const at::Tensor& x, int64_t factor);
Geometry grad_geometry(const at::Tensor& grad, int64_t factor);
// pixel_unshuffle_layernorm's forward, its arguments checked: the geometry, the number of output rows, the
// statistics dtype and the outputs, allocated on x's device (out [N, h*w/r^2, r*r*C]; mean, rstd [rows]).
struct LayerNormForward {
  Geometry g;
  int64_t num_rows;
  at::ScalarType acc_type;
  at::Tensor out, mean, rstd;
};
LayerNormForward prepare_layernorm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t factor);
// Checks pixel_unshuffle_layernorm's backward arguments; returns x's geometry.
Geometry check_layernorm_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& mean, const at::Tensor& rstd, int64_t factor);
// The statistics dtype: double for double x, else float.
at::ScalarType stats_type(const at::Tensor& x);

// pixel_unshuffle: x [N, h, w, C] -> [N, h/r, w/r, r*r*C]; its backward maps grad back to [N, h, w, C].
at::Tensor pixel_unshuffle_cpu(const at::Tensor& x, int64_t factor);
at::Tensor pixel_unshuffle_backward_cpu(const at::Tensor& grad, int64_t factor);
at::Tensor pixel_unshuffle_cuda(const at::Tensor& x, int64_t factor);
at::Tensor pixel_unshuffle_backward_cuda(const at::Tensor& grad, int64_t factor);

// pixel_unshuffle_layernorm: (out [N, h*w/r^2, r*r*C], mean, rstd [N*h*w/r^2]) and its backward
// (dx, dweight, dbias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                             const at::Tensor& bias, double eps, int64_t factor);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                      const at::Tensor& weight, const at::Tensor& mean,
                                                                      const at::Tensor& rstd, int64_t factor);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps, int64_t factor);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                       const at::Tensor& weight, const at::Tensor& mean,
                                                                       const at::Tensor& rstd, int64_t factor);

}  // namespace pixel_unshuffle
}  // namespace ie
