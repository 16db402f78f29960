// Qwen2 half-split rotary: the index and rotation math shared by the CPU and CUDA kernels.
// Element i < rotary_dim/2 of a head pairs with element i + rotary_dim/2; the pair rotates by
// angle = position * inv_freq[i], computed in float32 from the float32 position.
#pragma once

#include "common/host_device.h"

namespace ie {
namespace rotary {

IE_HOST_DEVICE float angle(float position, float inv_freq) { return position * inv_freq; }

// Offset of element `dim` of head `head` of token `token` in a contiguous [T, H, D] tensor.
IE_HOST_DEVICE int64_t offset(int64_t token, int64_t head, int64_t dim, int64_t num_heads, int64_t head_dim) {
  return (token * num_heads + head) * head_dim + dim;
}

// (y1, y2) = (x1, x2) rotated by the angle whose cosine and sine are given; `inverse` rotates back
// (the backward pass: the transpose of a rotation is its inverse).
template <typename acc_t>
IE_HOST_DEVICE void rotate(acc_t x1, acc_t x2, acc_t cos_a, acc_t sin_a, bool inverse, acc_t& y1, acc_t& y2) {
  const acc_t s = inverse ? -sin_a : sin_a;
  y1 = x1 * cos_a - x2 * s;
  y2 = x2 * cos_a + x1 * s;
}

}  // namespace rotary
}  // namespace ie
