// CUDA launcher of masked_area_pool: the patch weights in one pass over the
// masks (kernels/masked_area_pool.cuh), then the shared GEMM tail.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "csrc/ops/common.h"
#include "csrc/ops/cuda/launch.cuh"
#include "csrc/ops/masked_area_pool.h"
#include "kernels/masked_area_pool.cuh"

namespace weakseg {
namespace ops {

std::tuple<at::Tensor, at::Tensor> masked_area_pool_cuda(const at::Tensor& features, const at::Tensor& masks,
                                                         bool normalize) {
  auto m = check_masked_area_pool_args(features, masks);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = m.size(0), M = m.size(1), H = m.size(2), W = m.size(3);
  const int64_t h = features.size(2), w = features.size(3);
  auto weights = at::empty({B, M, h * w}, m.options().dtype(at::kFloat));
  const int64_t total = B * M * h * w;
  if (total > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    float* out = weights.data_ptr<float>();
    switch (m.scalar_type()) {
      case at::kByte:
        WS_LAUNCH(grid_for(total), kThreads, 0, stream, kernels::patch_weights_kernel<uint8_t>)(m.data_ptr<uint8_t>(), out,
                                                                                         B * M, H, W, h, w);
        break;
      case at::kDouble:
        WS_LAUNCH(grid_for(total), kThreads, 0, stream, kernels::patch_weights_kernel<double>)(m.data_ptr<double>(), out,
                                                                                        B * M, H, W, h, w);
        break;
      default:
        WS_LAUNCH(grid_for(total), kThreads, 0, stream, kernels::patch_weights_kernel<float>)(m.data_ptr<float>(), out,
                                                                                       B * M, H, W, h, w);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return pool_from_weights(features, weights, normalize);
}

TORCH_LIBRARY_IMPL(weakseg, CUDA, m) { m.impl("masked_area_pool", &masked_area_pool_cuda); }

}  // namespace ops
}  // namespace weakseg
