// C++ CPU kernels of scatter_visual (rows copied with memcpy, rows split over threads), and the
// operator schemas.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "common/checks.h"
#include "scatter_visual/scatter_visual.h"
#include "scatter_visual/scatter_visual_math.h"

namespace ie {
namespace scatter_visual {
namespace {

// Rows per parallel task: about 64 KiB of copying, enough to outweigh the task overhead.
int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, row_bytes)); }

void check_flags(const at::Tensor& is_visual, const at::Tensor& visual_before, int64_t tokens) {
  IE_CHECK_DIM(is_visual, 1);
  IE_CHECK_DIM(visual_before, 1);
  IE_CHECK_DTYPE(is_visual, at::kBool);
  IE_CHECK_DTYPE(visual_before, at::kLong);
  IE_CHECK_CONTIGUOUS(is_visual);
  IE_CHECK_CONTIGUOUS(visual_before);
  IE_CHECK_SAME_DEVICE(is_visual, visual_before);
  TORCH_CHECK(is_visual.size(0) == tokens && visual_before.size(0) == tokens,
              "is_visual and visual_before must have one entry per token");
}

}  // namespace

void check_forward_args(const at::Tensor& text, const at::Tensor& visual, const at::Tensor& is_visual,
                        const at::Tensor& visual_before) {
  IE_CHECK_DIM(text, 2);
  IE_CHECK_DIM(visual, 2);
  IE_CHECK_CONTIGUOUS(text);
  IE_CHECK_CONTIGUOUS(visual);
  IE_CHECK_SAME_DEVICE(text, visual);
  IE_CHECK_SAME_DEVICE(text, is_visual);
  TORCH_CHECK(text.scalar_type() == visual.scalar_type(), "text and visual must share a dtype, got ", text.scalar_type(),
              " and ", visual.scalar_type());
  TORCH_CHECK(text.size(1) == visual.size(1), "text and visual must have the same row size, got ", text.size(1), " and ",
              visual.size(1));
  check_flags(is_visual, visual_before, text.size(0));
}

void check_backward_args(const at::Tensor& grad, const at::Tensor& is_visual, const at::Tensor& visual_before,
                         int64_t num_visual) {
  IE_CHECK_DIM(grad, 2);
  IE_CHECK_CONTIGUOUS(grad);
  IE_CHECK_SAME_DEVICE(grad, is_visual);
  TORCH_CHECK(num_visual >= 0, "num_visual must be non-negative, got ", num_visual);
  check_flags(is_visual, visual_before, grad.size(0));
}

at::Tensor scatter_visual_cpu(const at::Tensor& text, const at::Tensor& visual, const at::Tensor& is_visual,
                              const at::Tensor& visual_before) {
  check_forward_args(text, visual, is_visual, visual_before);
  at::Tensor out = at::empty_like(text);
  const int64_t tokens = text.size(0), num_visual = visual.size(0);
  const int64_t row_bytes = text.size(1) * static_cast<int64_t>(text.element_size());
  if (tokens == 0 || row_bytes == 0) return out;
  const char* text_bytes = static_cast<const char*>(text.data_ptr());
  const char* visual_bytes = static_cast<const char*>(visual.data_ptr());
  char* out_bytes = static_cast<char*>(out.data_ptr());
  const bool* flags = is_visual.data_ptr<bool>();
  const int64_t* before = visual_before.data_ptr<int64_t>();
  at::parallel_for(0, tokens, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = source_row(flags[t], before[t], num_visual);
      const char* src = j >= 0 ? visual_bytes + j * row_bytes : text_bytes + t * row_bytes;
      std::memcpy(out_bytes + t * row_bytes, src, row_bytes);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scatter_visual_backward_cpu(const at::Tensor& grad, const at::Tensor& is_visual,
                                                               const at::Tensor& visual_before, int64_t num_visual) {
  check_backward_args(grad, is_visual, visual_before, num_visual);
  at::Tensor grad_text = at::empty_like(grad);
  // Every row of grad_visual is written exactly once when the visual count equals num_visual (the op checks).
  at::Tensor grad_visual = at::empty({num_visual, grad.size(1)}, grad.options());
  const int64_t tokens = grad.size(0);
  const int64_t row_bytes = grad.size(1) * static_cast<int64_t>(grad.element_size());
  if (tokens == 0 || row_bytes == 0) return {grad_text, grad_visual};
  const char* grad_bytes = static_cast<const char*>(grad.data_ptr());
  char* text_bytes = static_cast<char*>(grad_text.data_ptr());
  char* visual_bytes = static_cast<char*>(grad_visual.data_ptr());
  const bool* flags = is_visual.data_ptr<bool>();
  const int64_t* before = visual_before.data_ptr<int64_t>();
  at::parallel_for(0, tokens, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = source_row(flags[t], before[t], num_visual);
      if (j >= 0) {
        std::memcpy(visual_bytes + j * row_bytes, grad_bytes + t * row_bytes, row_bytes);
        std::memset(text_bytes + t * row_bytes, 0, row_bytes);  // all-zero bytes are +0.0 in every float dtype
      } else {
        std::memcpy(text_bytes + t * row_bytes, grad_bytes + t * row_bytes, row_bytes);
      }
    }
  });
  return {grad_text, grad_visual};
}

}  // namespace scatter_visual
}  // namespace ie

TORCH_LIBRARY_FRAGMENT(internvl3_engine_C, m) {
  m.def("scatter_visual(Tensor text, Tensor visual, Tensor is_visual, Tensor visual_before) -> Tensor");
  m.def(
      "scatter_visual_backward(Tensor grad, Tensor is_visual, Tensor visual_before, int num_visual) -> (Tensor, "
      "Tensor)");
}

TORCH_LIBRARY_IMPL(internvl3_engine_C, CPU, m) {
  m.impl("scatter_visual", &ie::scatter_visual::scatter_visual_cpu);
  m.impl("scatter_visual_backward", &ie::scatter_visual::scatter_visual_backward_cpu);
}
