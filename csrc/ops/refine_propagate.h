// Declarations shared by the CPU and CUDA implementations of refine_propagate
// and refine_propagate_qk.
#pragma once
#include <ATen/core/Tensor.h>

namespace weakseg {
namespace ops {
// Checks attn (B, P, P) and maps (B, P, K), ent and steps.
void check_refine_args(const at::Tensor& attn, const at::Tensor& maps, double ent, int64_t steps);
// Checks q, k (B, H, P, d), maps (B, P, K), ent, steps and scale.
void check_refine_qk_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& maps, double ent,
                          int64_t steps, double scale);
// The dtype the op computes and returns in: float64 for float64 input, else float32.
at::ScalarType refine_compute_type(const at::Tensor& input);
// The ERS cut: entries t = a / colmax <= refine_threshold(ent) give 0 after
// the clamp, so the kernels skip their logarithm. Slightly below the exact
// root of t + (ent / ln 10)(1 + ln t) = 0, so no entry that survives is cut.
double refine_threshold(double ent);
}  // namespace ops
}  // namespace weakseg
