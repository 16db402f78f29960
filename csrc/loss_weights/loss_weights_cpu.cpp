// C++ CPU kernel of loss_weights (segments split over threads: count, then write), and the operator schema.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "loss_weights/loss_weights.h"
#include "loss_weights/loss_weights_math.h"

namespace ie {
namespace loss_weights {

void check_args(const at::Tensor& labels, const at::Tensor& cu_seqlens, int64_t mode) {
  IE_CHECK_DIM(labels, 1);
  IE_CHECK_DIM(cu_seqlens, 1);
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, "labels must be int64 or int32, got ",
              labels.scalar_type());
  IE_CHECK_DTYPE(cu_seqlens, at::kInt);
  IE_CHECK_CONTIGUOUS(labels);
  IE_CHECK_CONTIGUOUS(cu_seqlens);
  IE_CHECK_SAME_DEVICE(labels, cu_seqlens);
  TORCH_CHECK(cu_seqlens.size(0) >= 1, "cu_seqlens must have at least one entry");
  TORCH_CHECK(mode == kToken || mode == kSample || mode == kSquare, "mode must be 0 (token), 1 (sample) or 2 (square), got ",
              mode);
}

at::Tensor loss_weights_cpu(const at::Tensor& labels, const at::Tensor& cu_seqlens, int64_t mode, int64_t ignore_index) {
  check_args(labels, cu_seqlens, mode);
  const int64_t tokens = labels.size(0), segments = cu_seqlens.size(0) - 1;
  // Zeros: tokens of segments without supervised tokens are never written.
  at::Tensor weights = at::zeros({tokens}, labels.options().dtype(at::kFloat));
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  float* out = weights.data_ptr<float>();
  AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "loss_weights_cpu", [&] {
    const index_t* label = labels.data_ptr<index_t>();
    at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        // Bound-checked against the label count: values are checked by the op, not trusted here.
        const int64_t start = std::min<int64_t>(std::max<int64_t>(cu[s], 0), tokens);
        const int64_t stop = std::min<int64_t>(std::max<int64_t>(cu[s + 1], start), tokens);
        int64_t count = 0;
        for (int64_t t = start; t < stop; ++t) count += supervised(label[t], ignore_index);
        if (count == 0) continue;
        const float w = sample_weight(count, mode);
        for (int64_t t = start; t < stop; ++t) out[t] = supervised(label[t], ignore_index) ? w : 0.0f;
      }
    });
  });
  return weights;
}

}  // namespace loss_weights
}  // namespace ie

TORCH_LIBRARY_FRAGMENT(internvl3_engine_C, m) {
  m.def("loss_weights(Tensor labels, Tensor cu_seqlens, int mode, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(internvl3_engine_C, CPU, m) { m.impl("loss_weights", &ie::loss_weights::loss_weights_cpu); }
