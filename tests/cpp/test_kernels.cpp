// C++ tests of the csrc/ kernels through the torch dispatcher and of their shared index math, run by ctest.
// The Python tests cover every backend in depth; these check the C++ library builds, registers its
// operators and computes the same results as ATen expressions of each op's definition.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "loss_weights/loss_weights_math.h"
#include "pixel_unshuffle/pixel_unshuffle_math.h"
#include "rotary/rotary_math.h"
#include "v2pe_positions/v2pe_positions_math.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cerr << "FAILED: " << what << "\n";
  }
}

void expect_close(const at::Tensor& actual, const at::Tensor& expected, double tol, const std::string& what) {
  const bool same_shape = actual.sizes() == expected.sizes();
  const double error = same_shape && actual.numel() ? (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>() : 0.0;
  expect(same_shape && error <= tol, what + " (max error " + std::to_string(error) + ")");
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Signature>();
}

void test_rotary_math() {
  expect(ie::rotary::offset(2, 1, 3, 4, 8) == (2 * 4 + 1) * 8 + 3, "rotary offset is row-major [T, H, D]");
  float y1, y2, z1, z2;
  ie::rotary::rotate<float>(0.3f, -1.2f, std::cos(0.7f), std::sin(0.7f), false, y1, y2);
  ie::rotary::rotate<float>(y1, y2, std::cos(0.7f), std::sin(0.7f), true, z1, z2);
  expect(std::abs(z1 - 0.3f) < 1e-6f && std::abs(z2 + 1.2f) < 1e-6f, "inverse rotation undoes the rotation");
}

void test_rotary_op() {
  auto rotary = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("internvl3_engine_C::rotary");
  const int64_t tokens = 7, heads = 3, head_dim = 10, half = 4;
  at::Tensor x = at::randn({tokens, heads, head_dim}, at::kDouble);
  at::Tensor positions = at::rand({tokens}, at::kFloat) * 1000;
  at::Tensor inv_freq = at::pow(1e6, -at::arange(0, 2 * half, 2, at::kDouble) / (2 * half)).to(at::kFloat);
  at::Tensor angles = (positions.unsqueeze(1) * inv_freq.unsqueeze(0)).to(at::kDouble).unsqueeze(1);
  at::Tensor x1 = x.narrow(2, 0, half), x2 = x.narrow(2, half, half);
  at::Tensor expected = at::cat({x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin(),
                                 x.narrow(2, 2 * half, head_dim - 2 * half)}, 2);
  at::Tensor out = rotary.call(x, positions, inv_freq, false);
  expect_close(out, expected, 1e-5, "rotary CPU kernel matches the ATen formula");
  expect_close(rotary.call(out, positions, inv_freq, true), x, 1e-5, "rotary inverse restores the input");
}

void test_pixel_unshuffle_op() {
  // InternVL's rule (ps_version 'v2') as ATen views: [n, A, B, c] -> [n, A/2, B/2, 4c].
  auto unshuffle = op<at::Tensor(const at::Tensor&, int64_t)>("internvl3_engine_C::pixel_unshuffle");
  const int64_t n = 2, a = 6, b = 4, c = 3;
  at::Tensor x = at::randn({n, a, b, c});
  at::Tensor expected = x.view({n, a, b / 2, 2 * c}).permute({0, 2, 1, 3}).contiguous().view({n, b / 2, a / 2, 4 * c})
                            .permute({0, 2, 1, 3}).contiguous();
  expect(at::equal(unshuffle.call(x, 2), expected), "pixel_unshuffle CPU kernel follows InternVL's view/permute rule");
  const ie::pixel_unshuffle::Geometry g{a, b, c, 2};
  expect(ie::pixel_unshuffle::row_source_base(g.out_w() + 1, g) == (2 * b + 2) * c, "row (0, 1, 1) starts at x[0, 2, 2]");
  expect(ie::pixel_unshuffle::source_offset_in_row(2 * c, g) == b * c, "the second chunk of a row comes from the next row of x");
}

void test_v2pe_positions_op() {
  auto positions = op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double)>(
      "internvl3_engine_C::v2pe_positions");
  // One sample: text, text, a 3-token image at delta 0.5, text; then a text-only sample of 2.
  at::Tensor is_visual = at::tensor({0, 0, 1, 1, 1, 0, 0, 0}, at::kInt).to(at::kBool);
  at::Tensor cu_seqlens = at::tensor({0, 6, 8}, at::kInt);
  at::Tensor expected = at::tensor({0.0f, 1.0f, 1.5f, 2.0f, 2.5f, 4.0f, 0.0f, 1.0f});
  expect(at::equal(positions.call(is_visual, cu_seqlens, std::nullopt, 0.5), expected), "V2PE worked example, delta 0.5");
  expect(ie::v2pe::position_after_image(1.0, 3, 0.5) == 3.0, "after an image pos = ceil(pos + n*delta)");
}

void test_loss_weights_op() {
  auto weights = op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>("internvl3_engine_C::loss_weights");
  // Sample 0 has 4 supervised tokens, sample 1 has 1.
  at::Tensor labels = at::tensor({-100, 5, 6, 7, 8, -100, 9}, at::kLong);
  at::Tensor cu_seqlens = at::tensor({0, 5, 7}, at::kInt);
  at::Tensor expected = at::tensor({0.0f, 0.5f, 0.5f, 0.5f, 0.5f, 0.0f, 1.0f});
  expect(at::equal(weights.call(labels, cu_seqlens, ie::loss_weights::kSquare, -100), expected), "square weights 1/sqrt(x)");
  expect(ie::loss_weights::sample_weight(4, ie::loss_weights::kSample) == 0.25f, "sample weight 1/x");
}

void test_scatter_visual_op() {
  auto scatter = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "internvl3_engine_C::scatter_visual");
  at::Tensor text = at::randn({5, 4}), visual = at::randn({2, 4});
  at::Tensor is_visual = at::tensor({0, 1, 0, 1, 0}, at::kInt).to(at::kBool);
  at::Tensor visual_before = at::cumsum(is_visual, 0) - is_visual.to(at::kLong);
  at::Tensor out = scatter.call(text, visual, is_visual, visual_before);
  at::Tensor expected = text.clone();
  expected[1] = visual[0];
  expected[3] = visual[1];
  expect(at::equal(out, expected), "scatter_visual places visual rows in order");
}

}  // namespace

int main() {
  const std::vector<std::pair<std::string, std::function<void()>>> tests = {
      {"rotary_math", test_rotary_math},
      {"rotary_op", test_rotary_op},
      {"pixel_unshuffle_op", test_pixel_unshuffle_op},
      {"v2pe_positions_op", test_v2pe_positions_op},
      {"loss_weights_op", test_loss_weights_op},
      {"scatter_visual_op", test_scatter_visual_op},
  };
  for (const auto& [name, run] : tests) {
    const int before = failures;
    try {
      run();
    } catch (const std::exception& error) {
      expect(false, name + " threw: " + std::string(error.what()).substr(0, 300));
    }
    std::cout << (failures == before ? "ok     " : "FAILED ") << name << "\n";
  }
  std::cout << (tests.size()) << " tests, " << failures << " failures\n";
  return failures == 0 ? 0 : 1;
}
