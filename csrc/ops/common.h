// Input checks and small helpers shared by the op implementations.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <limits>
#include <string>
#include <utility>

namespace weakseg {
namespace ops {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + ")";
}

// TORCH_CHECK with the op name first, so every error reads "weakseg.<op>: ...".
#define WS_CHECK(cond, op, ...) TORCH_CHECK(cond, "weakseg.", op, ": ", __VA_ARGS__)

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                              const char* op) {
  WS_CHECK(a.device() == b.device(), op, "expected ", a_name, " and ", b_name,
           " on the same device, got ", a.device(), " and ", b.device());
}

inline std::pair<int64_t, int64_t> window_radius(c10::IntArrayRef kernel_size, int64_t iterations, const char* op) {
  WS_CHECK(kernel_size.size() == 2, op, "kernel_size must have 2 elements (kh, kw), got ", kernel_size.size());
  for (auto k : kernel_size) {
    WS_CHECK(k >= 1 && k % 2 == 1, op, "kernel_size must be odd and positive, got (", kernel_size[0], ", ",
             kernel_size[1], ")");
  }
  WS_CHECK(iterations >= 0, op, "iterations must be >= 0, got ", iterations);
  // `iterations` passes of a k-window equal one pass of a ((k-1)*iterations+1)-window.
  // The product saturates instead of overflowing: every radius >= the image
  // extent gives the same result (the kernels clamp it to H / W first), and
  // kMaxRadius keeps 2r+1 representable as well.
  constexpr int64_t kMaxRadius = std::numeric_limits<int64_t>::max() / 4;
  auto radius = [&](int64_t k) {
    const int64_t r = k / 2;
    return (iterations != 0 && r > kMaxRadius / iterations) ? kMaxRadius : r * iterations;
  };
  return {radius(kernel_size[0]), radius(kernel_size[1])};
}

}  // namespace ops
}  // namespace weakseg
