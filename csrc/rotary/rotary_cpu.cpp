// C++ CPU kernel of apply_rotary, and the operator schema.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"
#include "rotary/rotary.h"
#include "rotary/rotary_math.h"

namespace ie {
namespace rotary {

void check_args(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq) {
  IE_CHECK_DIM(x, 3);
  IE_CHECK_DIM(positions, 1);
  IE_CHECK_DIM(inv_freq, 1);
  IE_CHECK_DTYPE(positions, at::kFloat);
  IE_CHECK_DTYPE(inv_freq, at::kFloat);
  IE_CHECK_CONTIGUOUS(x);
  IE_CHECK_CONTIGUOUS(positions);
  IE_CHECK_CONTIGUOUS(inv_freq);
  IE_CHECK_SAME_DEVICE(x, positions);
  IE_CHECK_SAME_DEVICE(x, inv_freq);
  TORCH_CHECK(positions.size(0) == x.size(0), "positions must have one entry per token of x");
  TORCH_CHECK(2 * inv_freq.size(0) <= x.size(2), "rotary_dim (2 * inv_freq length) must not exceed the head dim");
}

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq, bool inverse) {
  check_args(x, positions, inv_freq);
  at::Tensor out = at::empty_like(x);
  const int64_t tokens = x.size(0), heads = x.size(1), head_dim = x.size(2), half = inv_freq.size(0);
  const float* pos = positions.data_ptr<float>();
  const float* freq = inv_freq.data_ptr<float>();
  const bool vectorised = can_vectorise(head_dim, half, x.element_size(), x.data_ptr(), out.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    // The CUDA kernel's work per token, in one thread: the token's cosines and sines once, then every
    // head's pairs, VEC at a time.
    dispatch_vec<scalar_t>(vectorised, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> cos_a(half), sin_a(half);
        for (int64_t t = begin; t < end; ++t) {
          for (int64_t i = 0; i < half; ++i) {
            const float a = angle(pos[t], freq[i]);
            cos_a[i] = static_cast<acc_t>(std::cos(a));
            sin_a[i] = static_cast<acc_t>(std::sin(a));
          }
          for (int64_t h = 0; h < heads; ++h) {
            const int64_t head_offset = offset(t, h, 0, heads, head_dim);
            for (int64_t i0 = 0; i0 < half; i0 += VEC) {
              rotate_store_pairs<scalar_t, acc_t, VEC>(load_pairs<scalar_t, VEC>(src, head_offset, i0, half), dst, head_offset,
                                                       i0, half, cos_a.data(), sin_a.data(), inverse);
            }
            for (int64_t d = 2 * half; d < head_dim; ++d) dst[head_offset + d] = src[head_offset + d];
          }
        }
      });
    });
  });
  return out;
}

}  // namespace rotary
}  // namespace ie

TORCH_LIBRARY_FRAGMENT(internvl3_engine_C, m) {
  m.def("rotary(Tensor x, Tensor positions, Tensor inv_freq, bool inverse) -> Tensor");
}

TORCH_LIBRARY_IMPL(internvl3_engine_C, CPU, m) { m.impl("rotary", &ie::rotary::rotary_cpu); }
