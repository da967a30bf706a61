// Declarations shared by the CPU and CUDA implementations of knn_vote.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace weakseg {
namespace ops {
// The largest num_classes accepted (weakseg.ops.knn_vote.MAX_CLASSES): votes are
// Q x num_classes int64 and each CPU worker keeps a num_classes float buffer, so
// an unbounded value is a multi-GiB allocation; 2^16 keeps a query's vote row at
// 512 KiB, far above the label spaces in use (ImageNet-21k: 21,841 classes).
constexpr int64_t kKnnMaxClasses = int64_t(1) << 16;

struct KnnArgs {
  at::Tensor queries;      // (Q, D) float32, rows L2-normalised
  at::Tensor bank;         // (N, D) float32, rows L2-normalised
  at::Tensor bank_labels;  // (N,) int64
  int64_t k;               // clipped to N
};
// Checks the arguments (dtypes, shapes, devices, label range) and normalises.
KnnArgs prepare_knn_args(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& bank_labels, int64_t k,
                         int64_t num_classes);
// Outputs of a query set of Q rows: labels -1, confidence 0, votes 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_knn_outputs(int64_t Q, int64_t num_classes,
                                                                 const at::TensorOptions& opts);
}  // namespace ops
}  // namespace weakseg
