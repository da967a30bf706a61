// CUDA launcher of kl_kmeans: the Lloyd loop of kl_kmeans.cpp (cuBLAS GEMMs,
// tensor ops, no host sync after the argument check) with the fused
// assignment + accumulation kernel of kernels/kl_kmeans.cuh as its step.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "csrc/ops/common.h"
#include "csrc/ops/cuda/launch.cuh"
#include "csrc/ops/kl_kmeans.h"
#include "kernels/kl_kmeans.cuh"

namespace weakseg {
namespace ops {

static void kl_step_cuda(const at::Tensor& g, const at::Tensor& cconst, const at::Tensor& prev_counts,
                         const at::Tensor& x, at::Tensor& assign, at::Tensor& sums, at::Tensor& counts) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), S = g.size(2);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int blocks = grid_for(B * N * 32);  // one warp per point
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kl_kmeans_cuda", [&] {
    WS_LAUNCH(blocks, kernels::KL_THREADS, 0, stream, kernels::kl_assign_accumulate_kernel<scalar_t>)(
        g.data_ptr<scalar_t>(), cconst.data_ptr<scalar_t>(), prev_counts.data_ptr<int32_t>(),
        x.data_ptr<scalar_t>(), B, N, S, D, assign.data_ptr<int64_t>(), sums.data_ptr<scalar_t>(),
        counts.data_ptr<int32_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> kl_kmeans_cuda(const at::Tensor& x, const at::Tensor& seeds, int64_t iterations) {
  c10::cuda::CUDAGuard guard(x.device());
  return kl_kmeans_loop(prepare_kl_args(x, seeds, iterations), &kl_step_cuda);
}

TORCH_LIBRARY_IMPL(weakseg, CUDA, m) { m.impl("kl_kmeans", &kl_kmeans_cuda); }

}  // namespace ops
}  // namespace weakseg
