// Qwen2 half-split rotary: the index and rotation math shared by the CPU and CUDA kernels.
// Element i < rotary_dim/2 of a head pairs with element i + rotary_dim/2; the pair rotates by
// angle = position * inv_freq[i], computed in float32 from the float32 position.
#pragma once

#include "common/host_device.h"
#include "common/vector.h"

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

// Whether the kernels may move VEC = 16 / element_size elements at a time: both halves of every head start
// on a 16-byte boundary (head_dim and rotary_dim/2 multiples of VEC, both tensors 16-byte aligned).
inline bool can_vectorise(int64_t head_dim, int64_t half, int64_t element_size, const void* src, const void* dst) {
  return vectors_fit(element_size, {head_dim, half}, {src, dst});
}

// The VEC pairs (i0 + e, i0 + e + half), e < VEC, of the head starting at `head_offset`: one vector from
// each half of the head.
template <typename scalar_t, int VEC>
struct PairVectors {
  Pack<scalar_t, VEC> first, second;
};

template <typename scalar_t, int VEC>
IE_HOST_DEVICE PairVectors<scalar_t, VEC> load_pairs(const scalar_t* src, int64_t head_offset, int64_t i0, int64_t half) {
  return {load_pack<scalar_t, VEC>(src + head_offset + i0), load_pack<scalar_t, VEC>(src + head_offset + i0 + half)};
}

// Rotates loaded pairs with the token's per-pair cosines and sines (cos_a[i], sin_a[i] for i < half) and
// stores them where they were loaded from (in dst).
template <typename scalar_t, typename acc_t, int VEC>
IE_HOST_DEVICE void rotate_store_pairs(const PairVectors<scalar_t, VEC>& x, scalar_t* dst, int64_t head_offset, int64_t i0,
                                       int64_t half, const acc_t* cos_a, const acc_t* sin_a, bool inverse) {
  Pack<scalar_t, VEC> y1, y2;
  IE_UNROLL
  for (int e = 0; e < VEC; ++e) {
    acc_t a, b;
    rotate<acc_t>(static_cast<acc_t>(x.first.v[e]), static_cast<acc_t>(x.second.v[e]), cos_a[i0 + e], sin_a[i0 + e], inverse,
                  a, b);
    y1.v[e] = static_cast<scalar_t>(a);
    y2.v[e] = static_cast<scalar_t>(b);
  }
  store_pack<scalar_t, VEC>(dst + head_offset + i0, y1);
  store_pack<scalar_t, VEC>(dst + head_offset + i0 + half, y2);
}

}  // namespace rotary
}  // namespace ie
