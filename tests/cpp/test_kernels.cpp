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

#include "rotary/rotary_math.h"

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

}  // namespace

int main() {
  const std::vector<std::pair<std::string, std::function<void()>>> tests = {
      {"rotary_math", test_rotary_math},
      {"rotary_op", test_rotary_op},
  };
  for (const auto& [name, run] : tests) {
    const int before = failures;
    run();
    std::cout << (failures == before ? "ok     " : "FAILED ") << name << "\n";
  }
  std::cout << (tests.size()) << " tests, " << failures << " failures\n";
  return failures == 0 ? 0 : 1;
}
