// Declarations shared by the CPU and CUDA implementations of erode / erode_labels.
#pragma once
#include <ATen/core/Tensor.h>

namespace weakseg {
namespace ops {
void check_erode_mask(const at::Tensor& mask);
void check_erode_labels_args(const at::Tensor& labels, int64_t ignore_index);
}  // namespace ops
}  // namespace weakseg
