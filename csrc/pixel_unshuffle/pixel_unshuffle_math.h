// InternVL's pixel unshuffle (ps_version 'v2'): the index math shared by the CPU and CUDA kernels.
// x [N, h, w, C] -> out [N, h/r, w/r, r*r*C] with
//   out[n, i, j, k] = x[n, r*i + k / (r*C), r*j + (k % (r*C)) / C, k % C],
// so output row (n, i, j) is r contiguous chunks of r*C elements of x: chunk q (output elements
// [q*r*C, (q+1)*r*C)) is x[n, r*i + q, r*j : r*j + r, :]. Copies and gathers therefore stay coalesced on
// both sides, and the backward (the inverse permutation) uses the same offsets in the other direction.
#pragma once

#include "common/host_device.h"

namespace ie {
namespace pixel_unshuffle {

struct Geometry {
  int64_t h, w, channels, factor;
  IE_HOST_DEVICE int64_t out_h() const { return h / factor; }
  IE_HOST_DEVICE int64_t out_w() const { return w / factor; }
  // Elements in one output row (r*r*C) and in one contiguous chunk of it (r*C).
  IE_HOST_DEVICE int64_t row_width() const { return factor * factor * channels; }
  IE_HOST_DEVICE int64_t chunk_width() const { return factor * channels; }
};

// Offset in x of x[n, r*i, r*j, 0], the first element of output row `row` = (n*(h/r) + i)*(w/r) + j.
IE_HOST_DEVICE int64_t row_source_base(int64_t row, const Geometry& g) {
  const int64_t j = row % g.out_w();
  const int64_t rest = row / g.out_w();
  const int64_t i = rest % g.out_h();
  const int64_t n = rest / g.out_h();
  return ((n * g.h + g.factor * i) * g.w + g.factor * j) * g.channels;
}

// Offset, relative to row_source_base, of the x element that lands at position k of an output row.
IE_HOST_DEVICE int64_t source_offset_in_row(int64_t k, const Geometry& g) {
  const int64_t chunk = g.chunk_width();
  return (k / chunk) * g.w * g.channels + k % chunk;
}

}  // namespace pixel_unshuffle
}  // namespace ie
