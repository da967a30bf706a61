// erode / erode_labels: schema, input checks and CPU implementation.
// Kernel bodies: kernels/erode.h. CUDA launcher: cuda/erode.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "csrc/ops/common.h"
#include "csrc/ops/erode.h"
#include "kernels/erode.h"

namespace weakseg {
namespace ops {

using kernels::MaxOp;
using kernels::MinOp;

namespace {

constexpr int64_t kTile = kernels::kVanherkTile;

// Per-thread scratch that survives across calls (no page faults on every call);
// released when a call needed more than 64 MiB.
template <typename T>
struct Scratch {
  std::vector<T> a, b, c;
  void trim() {
    constexpr size_t kKeep = size_t(64) << 20;
    for (auto* v : {&a, &b, &c})
      if (v->capacity() * sizeof(T) > kKeep) std::vector<T>().swap(*v);
  }
};
template <typename T>
Scratch<T>& scratch() {
  thread_local Scratch<T> s;
  return s;
}

// Vertical pass of one plane, parallel over column tiles.
template <typename T, typename Op>
void vertical_parallel(const T* in, T* out, int64_t H, int64_t W, int64_t r, T identity) {
  const int64_t ntiles = kernels::ceil_div(W, kTile);
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    auto& buf = scratch<T>().c;
    buf.resize(static_cast<size_t>(kernels::vanherk_scratch(r, kTile)));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t x0 = t * kTile, cols = std::min(kTile, W - x0);
      kernels::vanherk_columns<T, Op>(in + x0, W, out + x0, W, H, cols, r, identity, buf.data());
    }
  });
}

template <typename T>
void transpose_parallel(const T* src, T* dst, int64_t rows, int64_t cols) {
  // Bands of 64 rows (a multiple of the 16-row SIMD tile).
  const int64_t nb = kernels::ceil_div(rows, 64);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    kernels::transpose_rows(src, dst, rows, cols, b0 * 64, std::min(rows, b1 * 64));
  });
}

}  // namespace

template <typename T, typename Op>
void rect_filter_cpu(const T* in, T* out, int64_t planes, int64_t H, int64_t W, int64_t ry, int64_t rx,
                     T identity) {
  ry = std::min(ry, H), rx = std::min(rx, W);  // a window past the image covers all of it
  const int64_t plane = H * W;
  if (planes >= at::get_num_threads()) {
    // Many planes: one plane per task, no synchronisation inside.
    at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
      auto& s = scratch<T>();
      for (int64_t p = p0; p < p1; ++p)
        kernels::filter_plane<T, Op>(in + p * plane, out + p * plane, H, W, ry, rx, identity, s.a, s.b, s.c);
      s.trim();
    });
    return;
  }
  // Few large planes: parallel inside each pass.
  auto& s = scratch<T>();
  s.a.resize(static_cast<size_t>(plane));
  s.b.resize(static_cast<size_t>(plane));
  T* tmp = s.a.data();
  T* tmp2 = s.b.data();
  for (int64_t p = 0; p < planes; ++p) {
    const T* src = in + p * plane;
    T* dst = out + p * plane;
    vertical_parallel<T, Op>(src, dst, H, W, ry, identity);
    if (rx == 0) continue;
    transpose_parallel(dst, tmp, H, W);
    vertical_parallel<T, Op>(tmp, tmp2, W, H, rx, identity);
    transpose_parallel(tmp2, dst, W, H);
  }
  s.trim();
}

static void check_plane_shape(const at::Tensor& t, const char* name, const char* op) {
  WS_CHECK(t.dim() >= 2, op, "expected ", name, " of shape (..., H, W), got ", shape_str(t));
}

void check_erode_mask(const at::Tensor& mask) {
  check_plane_shape(mask, "mask", "erode");
  WS_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte, "erode",
           "expected mask of dtype bool or uint8, got ", mask.scalar_type());
}

at::Tensor erode_cpu(const at::Tensor& mask, c10::IntArrayRef kernel_size, int64_t iterations) {
  check_erode_mask(mask);
  auto [ry, rx] = window_radius(kernel_size, iterations, "erode");
  auto src = mask.contiguous();
  auto out = at::empty_like(src);
  if (src.numel() == 0) return out;
  const int64_t H = src.size(-2), W = src.size(-1), planes = src.numel() / (H * W);
  // bool is stored as one byte 0/1; 255 is the identity of min for both dtypes.
  rect_filter_cpu<uint8_t, MinOp>(static_cast<const uint8_t*>(src.data_ptr()), static_cast<uint8_t*>(out.data_ptr()),
                                  planes, H, W, ry, rx, std::numeric_limits<uint8_t>::max());
  return out;
}

template <typename T>
void erode_labels_typed(const at::Tensor& src, at::Tensor& out, int64_t ry, int64_t rx, int64_t ignore_index) {
  const int64_t H = src.size(-2), W = src.size(-1), planes = src.numel() / (H * W);
  auto mn = at::empty_like(src), mx = at::empty_like(src);
  const T* in = src.data_ptr<T>();
  rect_filter_cpu<T, MinOp>(in, mn.data_ptr<T>(), planes, H, W, ry, rx, std::numeric_limits<T>::max());
  rect_filter_cpu<T, MaxOp>(in, mx.data_ptr<T>(), planes, H, W, ry, rx, std::numeric_limits<T>::lowest());
  const T* a = mn.data_ptr<T>();
  const T* b = mx.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const T ign = static_cast<T>(ignore_index);
  at::parallel_for(0, src.numel(), 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = (a[i] == b[i]) ? in[i] : ign;
  });
}

static void check_ignore_index(at::ScalarType st, int64_t ignore_index, const char* op) {
  int64_t lo = 0, hi = 0;
  switch (st) {
    case at::kByte: lo = 0; hi = 255; break;
    case at::kInt: lo = std::numeric_limits<int32_t>::min(); hi = std::numeric_limits<int32_t>::max(); break;
    default: lo = std::numeric_limits<int64_t>::min(); hi = std::numeric_limits<int64_t>::max();
  }
  WS_CHECK(ignore_index >= lo && ignore_index <= hi, op, "ignore_index ", ignore_index,
           " does not fit the labels' dtype ", st);
}

void check_erode_labels_args(const at::Tensor& labels, int64_t ignore_index) {
  const char* op = "erode_labels";
  check_plane_shape(labels, "labels", op);
  const auto st = labels.scalar_type();
  WS_CHECK(st == at::kLong || st == at::kInt || st == at::kByte, op,
           "expected labels of dtype int64, int32 or uint8, got ", st);
  check_ignore_index(st, ignore_index, op);
}

at::Tensor erode_labels_cpu(const at::Tensor& labels, c10::IntArrayRef kernel_size, int64_t iterations,
                            int64_t ignore_index) {
  check_erode_labels_args(labels, ignore_index);
  auto [ry, rx] = window_radius(kernel_size, iterations, "erode_labels");
  auto src = labels.contiguous();
  auto out = at::empty_like(src);
  if (src.numel() == 0) return out;
  switch (src.scalar_type()) {
    case at::kLong: erode_labels_typed<int64_t>(src, out, ry, rx, ignore_index); break;
    case at::kInt: erode_labels_typed<int32_t>(src, out, ry, rx, ignore_index); break;
    default: erode_labels_typed<uint8_t>(src, out, ry, rx, ignore_index); break;
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(weakseg, m) {
  m.def("erode(Tensor mask, int[2] kernel_size, int iterations=1) -> Tensor");
  m.def("erode_labels(Tensor labels, int[2] kernel_size, int iterations=1, int ignore_index=255) -> Tensor");
}

TORCH_LIBRARY_IMPL(weakseg, CPU, m) {
  m.impl("erode", &erode_cpu);
  m.impl("erode_labels", &erode_labels_cpu);
}

}  // namespace ops
}  // namespace weakseg
