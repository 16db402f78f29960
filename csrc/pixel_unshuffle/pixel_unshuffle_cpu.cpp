// C++ CPU kernels of pixel_unshuffle and pixel_unshuffle_layernorm, and the operator schemas.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "pixel_unshuffle/pixel_unshuffle.h"
#include "pixel_unshuffle/pixel_unshuffle_math.h"

namespace ie {
namespace pixel_unshuffle {

namespace {

void check_factor(int64_t factor) { TORCH_CHECK(factor >= 1, "factor must be >= 1, got ", factor); }

}  // namespace

Geometry input_geometry(const at::Tensor& x, int64_t factor) {
  check_factor(factor);
  IE_CHECK_DIM(x, 4);
  IE_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.size(1) % factor == 0 && x.size(2) % factor == 0, "x's h and w must be divisible by factor ", factor,
              ", got ", x.sizes());
  return Geometry{x.size(1), x.size(2), x.size(3), factor};
}

Geometry grad_geometry(const at::Tensor& grad, int64_t factor) {
  check_factor(factor);
  IE_CHECK_DIM(grad, 4);
  IE_CHECK_CONTIGUOUS(grad);
  TORCH_CHECK(grad.size(3) % (factor * factor) == 0, "grad's last dim must be divisible by factor^2, got ", grad.sizes());
  return Geometry{grad.size(1) * factor, grad.size(2) * factor, grad.size(3) / (factor * factor), factor};
}

namespace {

// Copies between output rows and their r chunks in x: x -> rows (forward) or rows -> x (backward).
void permute_cpu(const at::Tensor& x, const at::Tensor& rows, const Geometry& g, bool to_x) {
  const int64_t num_rows = rows.numel() / std::max<int64_t>(1, g.row_width());
  const int64_t element = x.element_size();
  const int64_t chunk_bytes = g.chunk_width() * element;
  char* x_bytes = static_cast<char*>(x.data_ptr());
  char* row_bytes = static_cast<char*>(rows.data_ptr());
  at::parallel_for(0, num_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row_source_base(row, g);
      for (int64_t q = 0; q < g.factor; ++q) {
        const int64_t k = q * g.chunk_width();
        char* x_chunk = x_bytes + (base + source_offset_in_row(k, g)) * element;
        char* row_chunk = row_bytes + (row * g.row_width() + k) * element;
        if (to_x) {
          std::memcpy(x_chunk, row_chunk, chunk_bytes);
        } else {
          std::memcpy(row_chunk, x_chunk, chunk_bytes);
        }
      }
    }
  });
}

// Output row `row` of pixel_unshuffle(x), gathered into `values` in the accumulation type.
template <typename scalar_t, typename acc_t>
void gather_row(const scalar_t* x, int64_t row, const Geometry& g, acc_t* values) {
  const int64_t base = row_source_base(row, g);
  for (int64_t q = 0; q < g.factor; ++q) {
    const scalar_t* chunk = x + base + source_offset_in_row(q * g.chunk_width(), g);
    acc_t* dst = values + q * g.chunk_width();
    for (int64_t m = 0; m < g.chunk_width(); ++m) dst[m] = static_cast<acc_t>(chunk[m]);
  }
}

}  // namespace

at::ScalarType stats_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

LayerNormForward prepare_layernorm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t factor) {
  const Geometry g = input_geometry(x, factor);
  IE_CHECK_DIM(weight, 1);
  IE_CHECK_DIM(bias, 1);
  IE_CHECK_SAME_DEVICE(x, weight);
  IE_CHECK_SAME_DEVICE(x, bias);
  TORCH_CHECK(weight.size(0) == g.row_width() && bias.size(0) == g.row_width(),
              "weight and bias must have factor^2 * C = ", g.row_width(), " entries");
  TORCH_CHECK(weight.scalar_type() == bias.scalar_type(), "weight and bias must share one dtype");
  const int64_t num_rows = x.size(0) * g.out_h() * g.out_w();
  const at::ScalarType acc_type = stats_type(x);
  const at::TensorOptions stats = x.options().dtype(acc_type);
  return {g, num_rows, acc_type, at::empty({x.size(0), g.out_h() * g.out_w(), g.row_width()}, x.options()),
          at::empty({num_rows}, stats), at::empty({num_rows}, stats)};
}

Geometry check_layernorm_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& mean, const at::Tensor& rstd, int64_t factor) {
  const Geometry g = input_geometry(x, factor);
  IE_CHECK_CONTIGUOUS(grad);
  IE_CHECK_SAME_DEVICE(x, grad);
  IE_CHECK_SAME_DEVICE(x, weight);
  IE_CHECK_SAME_DEVICE(x, mean);
  IE_CHECK_SAME_DEVICE(x, rstd);
  const int64_t num_rows = x.size(0) * g.out_h() * g.out_w();
  TORCH_CHECK(grad.numel() == num_rows * g.row_width() && grad.scalar_type() == x.scalar_type(),
              "grad must have x's dtype and one row of factor^2 * C per output row");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == g.row_width(), "weight must have factor^2 * C entries");
  IE_CHECK_DTYPE(mean, stats_type(x));
  IE_CHECK_DTYPE(rstd, stats_type(x));
  TORCH_CHECK(mean.numel() == num_rows && rstd.numel() == num_rows, "mean and rstd must have one entry per output row");
  IE_CHECK_CONTIGUOUS(mean);
  IE_CHECK_CONTIGUOUS(rstd);
  return g;
}

at::Tensor pixel_unshuffle_cpu(const at::Tensor& x, int64_t factor) {
  const Geometry g = input_geometry(x, factor);
  at::Tensor out = at::empty({x.size(0), g.out_h(), g.out_w(), g.row_width()}, x.options());
  if (out.numel() > 0) permute_cpu(x, out, g, /*to_x=*/false);
  return out;
}

at::Tensor pixel_unshuffle_backward_cpu(const at::Tensor& grad, int64_t factor) {
  const Geometry g = grad_geometry(grad, factor);
  at::Tensor dx = at::empty({grad.size(0), g.h, g.w, g.channels}, grad.options());
  if (dx.numel() > 0) permute_cpu(dx, grad, g, /*to_x=*/true);
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                             const at::Tensor& bias, double eps, int64_t factor) {
  const LayerNormForward forward = prepare_layernorm(x, weight, bias, factor);
  const Geometry g = forward.g;
  const int64_t width = g.row_width(), num_rows = forward.num_rows;
  const at::Tensor out = forward.out, mean = forward.mean, rstd = forward.rstd;
  if (num_rows == 0 || width == 0) return {out, mean, rstd};
  const at::Tensor w_acc = weight.to(forward.acc_type).contiguous(), b_acc = bias.to(forward.acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_unshuffle_layernorm_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const acc_t* w = w_acc.data_ptr<acc_t>();
    const acc_t* b = b_acc.data_ptr<acc_t>();
    acc_t* mean_out = mean.data_ptr<acc_t>();
    acc_t* rstd_out = rstd.data_ptr<acc_t>();
    at::parallel_for(0, num_rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> values(width);
      for (int64_t row = begin; row < end; ++row) {
        gather_row(src, row, g, values.data());
        // Row sums in double: a sequential float sum's error grows with the width (the reference's cascaded
        // sums do not), and double costs nothing here.
        double sum = 0;
        for (int64_t k = 0; k < width; ++k) sum += values[k];
        const acc_t mu = static_cast<acc_t>(sum / static_cast<double>(width));
        double squares = 0;
        for (int64_t k = 0; k < width; ++k) squares += static_cast<double>(values[k] - mu) * static_cast<double>(values[k] - mu);
        const acc_t inv_std = static_cast<acc_t>(1.0 / std::sqrt(squares / static_cast<double>(width) + eps));
        scalar_t* out_row = dst + row * width;
        for (int64_t k = 0; k < width; ++k) out_row[k] = static_cast<scalar_t>((values[k] - mu) * inv_std * w[k] + b[k]);
        mean_out[row] = mu;
        rstd_out[row] = inv_std;
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                      const at::Tensor& weight, const at::Tensor& mean,
                                                                      const at::Tensor& rstd, int64_t factor) {
  const Geometry g = check_layernorm_backward_args(grad, x, weight, mean, rstd, factor);
  const int64_t width = g.row_width(), num_rows = x.size(0) * g.out_h() * g.out_w();
  const at::ScalarType acc_type = stats_type(x);
  at::Tensor dx = at::empty_like(x);
  // A fixed split of the rows into partial sums (independent of the thread count): deterministic results.
  const int64_t num_partials = std::min<int64_t>(num_rows, 64);
  // Sums over rows and within a row in double (see layernorm_cpu).
  at::Tensor partial_dw = at::zeros({num_partials, width}, x.options().dtype(at::kDouble));
  at::Tensor partial_db = at::zeros({num_partials, width}, x.options().dtype(at::kDouble));
  if (num_rows > 0 && width > 0) {
    const at::Tensor w_acc = weight.to(acc_type).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_unshuffle_layernorm_backward_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const scalar_t* src = x.data_ptr<scalar_t>();
      const scalar_t* gsrc = grad.data_ptr<scalar_t>();
      scalar_t* dx_data = dx.data_ptr<scalar_t>();
      const acc_t* w = w_acc.data_ptr<acc_t>();
      const acc_t* mean_in = mean.data_ptr<acc_t>();
      const acc_t* rstd_in = rstd.data_ptr<acc_t>();
      double* dw_all = partial_dw.data_ptr<double>();
      double* db_all = partial_db.data_ptr<double>();
      at::parallel_for(0, num_partials, 1, [&](int64_t p_begin, int64_t p_end) {
        std::vector<acc_t> xhat(width), gw(width);
        for (int64_t p = p_begin; p < p_end; ++p) {
          double* dw = dw_all + p * width;
          double* db = db_all + p * width;
          for (int64_t row = p * num_rows / num_partials; row < (p + 1) * num_rows / num_partials; ++row) {
            gather_row(src, row, g, xhat.data());
            const acc_t mu = mean_in[row], inv_std = rstd_in[row];
            const scalar_t* g_row = gsrc + row * width;
            double sum_gw = 0, sum_gw_xhat = 0;
            for (int64_t k = 0; k < width; ++k) {
              const acc_t gk = static_cast<acc_t>(g_row[k]);
              xhat[k] = (xhat[k] - mu) * inv_std;
              gw[k] = gk * w[k];
              sum_gw += gw[k];
              sum_gw_xhat += gw[k] * xhat[k];
              dw[k] += gk * xhat[k];
              db[k] += gk;
            }
            const acc_t mean_gw = static_cast<acc_t>(sum_gw / static_cast<double>(width));
            const acc_t mean_gw_xhat = static_cast<acc_t>(sum_gw_xhat / static_cast<double>(width));
            const int64_t base = row_source_base(row, g);
            for (int64_t k = 0; k < width; ++k) {
              dx_data[base + source_offset_in_row(k, g)] =
                  static_cast<scalar_t>(inv_std * (gw[k] - mean_gw - xhat[k] * mean_gw_xhat));
            }
          }
        }
      });
    });
  }
  return {dx, partial_dw.sum(0).to(weight.scalar_type()), partial_db.sum(0).to(weight.scalar_type())};
}

}  // namespace pixel_unshuffle
}  // namespace ie

TORCH_LIBRARY_FRAGMENT(internvl3_engine_C, m) {
  m.def("pixel_unshuffle(Tensor x, int factor) -> Tensor");
  m.def("pixel_unshuffle_backward(Tensor grad, int factor) -> Tensor");
  m.def("pixel_unshuffle_layernorm(Tensor x, Tensor weight, Tensor bias, float eps, int factor) -> (Tensor, Tensor, Tensor)");
  m.def(
      "pixel_unshuffle_layernorm_backward(Tensor grad, Tensor x, Tensor weight, Tensor mean, Tensor rstd, int factor)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(internvl3_engine_C, CPU, m) {
  m.impl("pixel_unshuffle", &ie::pixel_unshuffle::pixel_unshuffle_cpu);
  m.impl("pixel_unshuffle_backward", &ie::pixel_unshuffle::pixel_unshuffle_backward_cpu);
  m.impl("pixel_unshuffle_layernorm", &ie::pixel_unshuffle::layernorm_cpu);
  m.impl("pixel_unshuffle_layernorm_backward", &ie::pixel_unshuffle::layernorm_backward_cpu);
}
