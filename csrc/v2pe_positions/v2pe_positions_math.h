// V2PE position arithmetic shared by the CPU and CUDA kernels, so that both (and the torch reference,
// which performs the same IEEE float64 operations) agree bit for bit.
//
// Within a segment pos starts at -1; a text token takes pos + 1; the k-th token (k = 1..n) of an image of
// n visual tokens takes pos + k * delta, after which pos = ceil(pos + n * delta). pos before an image is
// always an integer, so the float64 arithmetic below is exact up to the single rounding of k * delta and
// of the sum; a token's position is rounded to float32 once, by the caller.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace ie {
namespace v2pe {

// pos at the start of every segment: the first text token takes 0.
constexpr double kStartPosition = -1.0;

// pos + k * delta, each operation rounded to float64. nvcc would contract the expression into an FMA
// (one rounding), which the CPU and torch do not do, so the device path rounds each step explicitly.
IE_HOST_DEVICE double offset_position(double pos, int64_t k, double delta) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(pos, __dmul_rn(static_cast<double>(k), delta));
#else
  return pos + static_cast<double>(k) * delta;
#endif
}

// Position of a text token that follows pos.
IE_HOST_DEVICE double text_position(double pos) { return pos + 1.0; }

// Position of the k-th token (k = 1..n) of an image that starts after pos.
IE_HOST_DEVICE double visual_position(double pos, int64_t k, double delta) { return offset_position(pos, k, delta); }

// pos after an image of n tokens: ceil(pos + n * delta), again an integer.
IE_HOST_DEVICE double position_after_image(double pos, int64_t n, double delta) { return ::ceil(offset_position(pos, n, delta)); }

// Whether token t of the segment starting at `segment_start` begins an image: a visual token that is the
// segment's first or follows a text token (a visual run crossing a segment boundary is two images).
IE_HOST_DEVICE bool starts_image(const bool* is_visual, int64_t t, int64_t segment_start) {
  return is_visual[t] && (t == segment_start || !is_visual[t - 1]);
}

// Bounds [begin, end) of segment b, clamped into [0, tokens] so that a kernel never indexes outside the
// tokens even for cu_seqlens the op's validation would reject.
IE_HOST_DEVICE void segment_bounds(const int32_t* cu_seqlens, int64_t b, int64_t tokens, int64_t& begin, int64_t& end) {
  begin = cu_seqlens[b] < 0 ? 0 : (cu_seqlens[b] > tokens ? tokens : cu_seqlens[b]);
  end = cu_seqlens[b + 1] < begin ? begin : (cu_seqlens[b + 1] > tokens ? tokens : cu_seqlens[b + 1]);
}

// Number of images of a segment.
IE_HOST_DEVICE int64_t count_images(const bool* is_visual, int64_t begin, int64_t end) {
  int64_t images = 0;
  for (int64_t t = begin; t < end; ++t) images += starts_image(is_visual, t, begin) ? 1 : 0;
  return images;
}

// Writes the positions of the tokens of one segment, whose first image has index `first_image` in the
// pack. Image i's delta is deltas[i] when `deltas` is given (num_deltas entries; an index past them gives
// NaN rather than a read out of bounds), else `delta_scalar`.
IE_HOST_DEVICE void write_segment_positions(const bool* is_visual, int64_t begin, int64_t end, int64_t first_image,
                                            const float* deltas, int64_t num_deltas, double delta_scalar, float* out) {
  double pos = kStartPosition;
  int64_t image = first_image;
  int64_t t = begin;
  while (t < end) {
    if (!is_visual[t]) {
      pos = text_position(pos);
      out[t] = static_cast<float>(pos);
      ++t;
      continue;
    }
    int64_t run_end = t + 1;
    while (run_end < end && is_visual[run_end]) ++run_end;
    const int64_t n = run_end - t;
    double delta = delta_scalar;
    if (deltas != nullptr) delta = image < num_deltas ? static_cast<double>(deltas[image]) : NAN;
    for (int64_t k = 1; k <= n; ++k) out[t + k - 1] = static_cast<float>(visual_position(pos, k, delta));
    pos = position_after_image(pos, n, delta);
    ++image;
    t = run_end;
  }
}

}  // namespace v2pe
}  // namespace ie
