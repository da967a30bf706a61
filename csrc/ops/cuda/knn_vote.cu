// CUDA launcher of knn_vote: the bank is streamed in tiles; each tile's
// similarities come from one cuBLAS GEMM (a Q-tile x N-tile buffer, never
// Q x N), and kernels/knn_vote.cuh merges them into every query's running
// top-k and finally votes.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "csrc/ops/common.h"
#include "csrc/ops/cuda/launch.cuh"
#include "csrc/ops/knn_vote.h"
#include "kernels/knn_vote.cuh"

namespace weakseg {
namespace ops {

constexpr int64_t kMaxCudaK = 1024;

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_vote_cuda(const at::Tensor& queries, const at::Tensor& bank,
                                                             const at::Tensor& bank_labels, int64_t k,
                                                             int64_t num_classes) {
  c10::cuda::CUDAGuard guard(queries.device());
  auto a = prepare_knn_args(queries, bank, bank_labels, k, num_classes);
  const int64_t Q = a.queries.size(0), N = a.bank.size(0), kk = a.k;
  WS_CHECK(kk <= kMaxCudaK, "knn_vote", "k must be <= ", kMaxCudaK, " on CUDA, got ", kk);
  auto [labels, conf, votes] = empty_knn_outputs(Q, num_classes, a.queries.options());
  if (Q == 0 || kk == 0) return {labels, conf, votes};

  auto stream = c10::cuda::getCurrentCUDAStream();
  auto top_v = at::full({Q, kk}, -std::numeric_limits<float>::infinity(), a.queries.options());
  auto top_i = at::full({Q, kk}, std::numeric_limits<int64_t>::max(), a.queries.options().dtype(at::kLong));
  int cap = 1;
  while (cap < kk + kernels::KNN_SEG) cap <<= 1;
  const size_t smem = static_cast<size_t>(cap) * (sizeof(int64_t) + sizeof(float));
  // Tiles hold at most 2^28 similarities (1 GiB of fp32).
  constexpr int64_t kTileElems = int64_t(1) << 28;
  const int64_t QT = std::min<int64_t>(Q, 65536);
  const int64_t NT = std::max<int64_t>(1024, std::min<int64_t>(N, kTileElems / QT));
  for (int64_t q0 = 0; q0 < Q; q0 += QT) {
    const int64_t qn = std::min(QT, Q - q0);
    auto qs = a.queries.narrow(0, q0, qn);
    auto tv = top_v.narrow(0, q0, qn);
    auto ti = top_i.narrow(0, q0, qn);
    for (int64_t n0 = 0; n0 < N; n0 += NT) {
      const int64_t nn = std::min(NT, N - n0);
      auto sims = at::mm(qs, a.bank.narrow(0, n0, nn).t()).contiguous();
      WS_LAUNCH(static_cast<unsigned int>(qn), kernels::KNN_THREADS, smem, stream, kernels::topk_merge_kernel)(
          sims.data_ptr<float>(), nn, n0, tv.data_ptr<float>(), ti.data_ptr<int64_t>(), kk, cap);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  auto voter_labels = at::empty({Q, kk}, top_i.options());
  auto sums = at::zeros({Q, num_classes}, a.queries.options());
  WS_LAUNCH(grid_for(Q), kThreads, 0, stream, kernels::vote_kernel)(
      top_v.data_ptr<float>(), top_i.data_ptr<int64_t>(), a.bank_labels.data_ptr<int64_t>(), Q, kk, num_classes,
      voter_labels.data_ptr<int64_t>(), votes.data_ptr<int64_t>(), sums.data_ptr<float>(), labels.data_ptr<int64_t>(),
      conf.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {labels, conf, votes};
}

TORCH_LIBRARY_IMPL(weakseg, CUDA, m) { m.impl("knn_vote", &knn_vote_cuda); }

}  // namespace ops
}  // namespace weakseg
