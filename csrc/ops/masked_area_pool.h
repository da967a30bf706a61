// Declarations shared by the CPU and CUDA implementations of masked_area_pool.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace weakseg {
namespace ops {
// Checks the arguments; returns the masks as a contiguous tensor of a dtype the
// kernels read (uint8 for bool/uint8, float32 or float64 otherwise).
at::Tensor check_masked_area_pool_args(const at::Tensor& features, const at::Tensor& masks);
// Everything after the patch weights (B, M, h*w): one batched GEMM with the
// features, the division by the area, and the optional L2 normalisation.
std::tuple<at::Tensor, at::Tensor> pool_from_weights(const at::Tensor& features, const at::Tensor& weights,
                                                     bool normalize);
}  // namespace ops
}  // namespace weakseg
