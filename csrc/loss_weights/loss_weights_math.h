// Per-token loss weights of InternVL's loss reductions, shared by the CPU and CUDA kernels.
// With x the number of supervised tokens (label != ignore_index) of a token's sample:
//   token: w = 1;  sample: w = 1/x;  square: w = 1/sqrt(x);  unsupervised tokens: w = 0.
// Every backend computes w bit-identically: x is an exact integer count, converted to float32 exactly
// (x < 2^24 since cu_seqlens is int32 and packs are far shorter), and sqrt and the division are each
// correctly rounded float32 operations (IEEE round-to-nearest).
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace ie {
namespace loss_weights {

// Codes of the reduction modes, as passed by the Python op.
enum Mode : int64_t { kToken = 0, kSample = 1, kSquare = 2 };

IE_HOST_DEVICE bool supervised(int64_t label, int64_t ignore_index) { return label != ignore_index; }

// Weight of each supervised token of a sample with `count` > 0 supervised tokens.
IE_HOST_DEVICE float sample_weight(int64_t count, int64_t mode) {
  const float x = static_cast<float>(count);
#if defined(__CUDA_ARCH__)
  // The _rn intrinsics are correctly rounded whatever the compiler flags (--use_fast_math included).
  if (mode == kSample) return __fdiv_rn(1.0f, x);
  if (mode == kSquare) return __fdiv_rn(1.0f, __fsqrt_rn(x));
#else
  if (mode == kSample) return 1.0f / x;
  if (mode == kSquare) return 1.0f / std::sqrt(x);
#endif
  return 1.0f;
}

}  // namespace loss_weights
}  // namespace ie
