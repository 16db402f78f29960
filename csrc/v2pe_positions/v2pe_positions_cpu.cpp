// C++ CPU kernel of v2pe_position_ids, and the operator schema. Two passes, each parallel over segments:
// count the images of every segment, then (with each segment's first image index from an exclusive
// prefix sum of the counts) scan every segment, writing its positions.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "v2pe_positions/v2pe_positions.h"
#include "v2pe_positions/v2pe_positions_math.h"

// The checks throw c10::Error (RuntimeError in Python), not c10::ValueError: a ValueError thrown from this
// extension crashed the process under torch 2.11 on a GPU machine (bench/results/README.md) while
// c10::Error propagated. The Python op raises ValueError for every one of these before a kernel runs.
namespace ie {
namespace v2pe {

void check_args(const at::Tensor& is_visual, const at::Tensor& cu_seqlens, const c10::optional<at::Tensor>& delta_per_image,
                double delta_scalar) {
  IE_CHECK_DIM(is_visual, 1);
  IE_CHECK_DIM(cu_seqlens, 1);
  IE_CHECK_DTYPE(is_visual, at::kBool);
  IE_CHECK_DTYPE(cu_seqlens, at::kInt);
  IE_CHECK_CONTIGUOUS(is_visual);
  IE_CHECK_CONTIGUOUS(cu_seqlens);
  IE_CHECK_SAME_DEVICE(is_visual, cu_seqlens);
  TORCH_CHECK(cu_seqlens.size(0) >= 1, "cu_seqlens must have at least one entry (0)");
  if (delta_per_image.has_value()) {
    const at::Tensor& deltas = *delta_per_image;
    IE_CHECK_DIM(deltas, 1);
    IE_CHECK_DTYPE(deltas, at::kFloat);
    IE_CHECK_CONTIGUOUS(deltas);
    IE_CHECK_SAME_DEVICE(is_visual, deltas);
  } else {
    TORCH_CHECK(delta_scalar > 0 && delta_scalar <= 1, "delta must be in (0, 1], got ", delta_scalar);
  }
}

void check_delta_count(const c10::optional<at::Tensor>& delta_per_image, int64_t num_images) {
  if (!delta_per_image.has_value()) return;
  const int64_t num_deltas = delta_per_image->size(0);
  TORCH_CHECK(num_deltas == num_images, "delta must have one entry per image: got ", num_deltas, " deltas for ",
              num_images, " images");
}

at::Tensor v2pe_positions_cpu(const at::Tensor& is_visual, const at::Tensor& cu_seqlens,
                              const c10::optional<at::Tensor>& delta_per_image, double delta_scalar) {
  check_args(is_visual, cu_seqlens, delta_per_image, delta_scalar);
  const int64_t tokens = is_visual.size(0), segments = cu_seqlens.size(0) - 1;
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  // Direct callers get the op's cu_seqlens checks too (cheap on the host): every token has a segment.
  TORCH_CHECK(cu[0] == 0, "cu_seqlens must start at 0, got ", cu[0]);
  for (int64_t b = 0; b < segments; ++b) TORCH_CHECK(cu[b + 1] >= cu[b], "cu_seqlens must never decrease");
  TORCH_CHECK(cu[segments] == tokens, "cu_seqlens must end at the number of tokens ", tokens, ", got ", cu[segments]);

  const bool* visual = is_visual.data_ptr<bool>();
  std::vector<int64_t> first_image(segments + 1, 0);
  at::parallel_for(0, segments, 1, [&](int64_t begin_b, int64_t end_b) {
    for (int64_t b = begin_b; b < end_b; ++b) {
      int64_t begin, end;
      segment_bounds(cu, b, tokens, begin, end);
      first_image[b + 1] = count_images(visual, begin, end);
    }
  });
  for (int64_t b = 0; b < segments; ++b) first_image[b + 1] += first_image[b];
  check_delta_count(delta_per_image, first_image[segments]);

  at::Tensor out = at::empty({tokens}, is_visual.options().dtype(at::kFloat));
  const float* deltas = delta_per_image.has_value() ? delta_per_image->data_ptr<float>() : nullptr;
  const int64_t num_deltas = delta_per_image.has_value() ? delta_per_image->size(0) : 0;
  float* positions = out.data_ptr<float>();
  at::parallel_for(0, segments, 1, [&](int64_t begin_b, int64_t end_b) {
    for (int64_t b = begin_b; b < end_b; ++b) {
      int64_t begin, end;
      segment_bounds(cu, b, tokens, begin, end);
      write_segment_positions(visual, begin, end, first_image[b], deltas, num_deltas, delta_scalar, positions);
    }
  });
  return out;
}

}  // namespace v2pe
}  // namespace ie

TORCH_LIBRARY_FRAGMENT(internvl3_engine_C, m) {
  m.def("v2pe_positions(Tensor is_visual, Tensor cu_seqlens, Tensor? delta_per_image, float delta_scalar) -> Tensor");
}

TORCH_LIBRARY_IMPL(internvl3_engine_C, CPU, m) { m.impl("v2pe_positions", &ie::v2pe::v2pe_positions_cpu); }
