// Declarations shared by the CPU and CUDA implementations of kl_kmeans.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace weakseg {
namespace ops {
struct KlArgs {
  at::Tensor x;             // (B, N, D) float64 (every backend computes in float64), contiguous
  at::Tensor seeds;         // (S,) int64, in [0, N) when N > 0
  int64_t iterations;       // >= 1
  at::ScalarType out_dtype; // of the centroids: float32, or float64 for float64 input
};
// Checks the arguments (dtypes, shapes, devices, seed range) and converts.
KlArgs prepare_kl_args(const at::Tensor& x, const at::Tensor& seeds, int64_t iterations);

// One assignment + accumulation step (the device-specific part):
//   g (B, N, S) GEMM rows, cconst (B, S) anchor constants, prev_counts (B, S)
//   int32 (anchor alive iff > 0), x (B, N, D) raw rows, all float64 but the counts; writes assign (B, N)
//   int64 and adds into sums (B, S, D) and counts (B, S) int32 (zero on entry).
using KlStepFn = void (*)(const at::Tensor& g, const at::Tensor& cconst, const at::Tensor& prev_counts,
                          const at::Tensor& x, at::Tensor& assign, at::Tensor& sums, at::Tensor& counts);

// The Lloyd iterations around `step`: GEMM scores, anchor updates with dead
// anchors masked in place (no host sync), the final contiguous relabelling.
std::tuple<at::Tensor, at::Tensor> kl_kmeans_loop(const KlArgs& a, KlStepFn step);
}  // namespace ops
}  // namespace weakseg
