// CUDA launcher of erode / erode_labels. Bodies: kernels/erode.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <limits>

#include "csrc/ops/common.h"
#include "csrc/ops/cuda/launch.cuh"
#include "csrc/ops/erode.h"
#include "kernels/erode.cuh"

namespace weakseg {
namespace ops {

using kernels::MaxOp;
using kernels::MinOp;

// One 1-D pass over `planes` planes: L lines of n elements, strides as in kernels/erode.cuh.
template <typename T, typename Op>
static void line_pass(const T* in, T* out, T* G, T* Hs, int64_t planes, int64_t L, int64_t n, int64_t plane_stride,
                      int64_t ls, int64_t es, int64_t r, T identity, cudaStream_t stream) {
  const int64_t k = 2 * r + 1, m = n + 2 * r;
  const int64_t blocks_total = planes * kernels::ceil_div(m, k) * L;
  WS_LAUNCH(grid_for(blocks_total), kThreads, 0, stream, kernels::vanherk_blocks_kernel<T, Op>)(
      in, G, Hs, planes, L, n, plane_stride, ls, es, r, identity);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  WS_LAUNCH(grid_for(planes * n * L), kThreads, 0, stream, kernels::vanherk_combine_kernel<T, Op>)(
      G, Hs, out, planes, L, n, plane_stride, ls, es, r);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Separable 2-D filter: vertical pass into `out`, horizontal pass back in place via `tmp`.
template <typename T, typename Op>
static void rect_filter_cuda(const T* in, T* out, T* tmp, int64_t planes, int64_t H, int64_t W, int64_t ry,
                             int64_t rx, T identity, const at::Tensor& like) {
  ry = std::min(ry, H), rx = std::min(rx, W);  // a window past the image covers all of it
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Scratch for G and Hs of the larger of the two passes.
  const int64_t scratch = planes * std::max((H + 2 * ry) * W, (W + 2 * rx) * H);
  auto g = at::empty({scratch}, like.options());
  auto h = at::empty({scratch}, like.options());
  T* G = static_cast<T*>(g.data_ptr());
  T* Hs = static_cast<T*>(h.data_ptr());
  const int64_t plane = H * W;
  // vertical: lines are the W columns (ls = 1), elements step by W.
  line_pass<T, Op>(in, tmp, G, Hs, planes, W, H, plane, 1, W, ry, identity, stream);
  // horizontal: lines are the H rows (ls = W), elements step by 1.
  line_pass<T, Op>(tmp, out, G, Hs, planes, H, W, plane, W, 1, rx, identity, stream);
}

at::Tensor erode_cuda(const at::Tensor& mask, c10::IntArrayRef kernel_size, int64_t iterations) {
  check_erode_mask(mask);
  auto [ry, rx] = window_radius(kernel_size, iterations, "erode");
  c10::cuda::CUDAGuard guard(mask.device());
  auto src = mask.contiguous();
  auto out = at::empty_like(src);
  if (src.numel() == 0) return out;
  const int64_t H = src.size(-2), W = src.size(-1), planes = src.numel() / (H * W);
  auto tmp = at::empty_like(src);
  rect_filter_cuda<uint8_t, MinOp>(static_cast<const uint8_t*>(src.data_ptr()), static_cast<uint8_t*>(out.data_ptr()),
                                   static_cast<uint8_t*>(tmp.data_ptr()), planes, H, W, ry, rx,
                                   std::numeric_limits<uint8_t>::max(), src);
  return out;
}

template <typename T>
static void erode_labels_typed_cuda(const at::Tensor& src, at::Tensor& out, int64_t ry, int64_t rx,
                                    int64_t ignore_index) {
  const int64_t H = src.size(-2), W = src.size(-1), planes = src.numel() / (H * W);
  auto mn = at::empty_like(src), mx = at::empty_like(src), tmp = at::empty_like(src);
  const T* in = src.data_ptr<T>();
  rect_filter_cuda<T, MinOp>(in, mn.data_ptr<T>(), tmp.data_ptr<T>(), planes, H, W, ry, rx,
                             std::numeric_limits<T>::max(), src);
  rect_filter_cuda<T, MaxOp>(in, mx.data_ptr<T>(), tmp.data_ptr<T>(), planes, H, W, ry, rx,
                             std::numeric_limits<T>::lowest(), src);
  auto stream = c10::cuda::getCurrentCUDAStream();
  WS_LAUNCH(grid_for(src.numel()), kThreads, 0, stream, kernels::labels_keep_kernel<T>)(
      in, mn.data_ptr<T>(), mx.data_ptr<T>(), out.data_ptr<T>(), src.numel(), static_cast<T>(ignore_index));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor erode_labels_cuda(const at::Tensor& labels, c10::IntArrayRef kernel_size, int64_t iterations,
                             int64_t ignore_index) {
  check_erode_labels_args(labels, ignore_index);
  auto [ry, rx] = window_radius(kernel_size, iterations, "erode_labels");
  c10::cuda::CUDAGuard guard(labels.device());
  auto src = labels.contiguous();
  auto out = at::empty_like(src);
  if (src.numel() == 0) return out;
  switch (src.scalar_type()) {
    case at::kLong: erode_labels_typed_cuda<int64_t>(src, out, ry, rx, ignore_index); break;
    case at::kInt: erode_labels_typed_cuda<int32_t>(src, out, ry, rx, ignore_index); break;
    default: erode_labels_typed_cuda<uint8_t>(src, out, ry, rx, ignore_index); break;
  }
  return out;
}

TORCH_LIBRARY_IMPL(weakseg, CUDA, m) {
  m.impl("erode", &erode_cuda);
  m.impl("erode_labels", &erode_labels_cuda);
}

}  // namespace ops
}  // namespace weakseg
