// CUDA body of kl_kmeans: the fused assignment + accumulation step.
//
// One warp per point: the lanes split the anchors, each keeps its best alive
// anchor (kernels/kl_kmeans.h, the same rule as the CPU loop), a butterfly of
// shuffles gives every lane the warp's winner, then the lanes add the point's
// raw row into that anchor's sum (coalesced atomicAdd over D) and lane 0
// counts it. The op runs it with T = double (csrc/ops/kl_kmeans.cpp): float64
// scores, and float64 sums whose rounding, whatever the order of the atomics,
// stays far below the float32 output. Dead anchors stay in place (masked by
// prev_counts == 0), so the host never has to look at the alive set.
#pragma once
#include <cstdint>

#include "kernels/common.h"
#include "kernels/kl_kmeans.h"

namespace weakseg {
namespace kernels {

constexpr int KL_THREADS = 256;  // 8 warps per block

// g: (B, N, S) GEMM rows; cconst, prev_counts: (B, S); x: (B, N, D) raw rows.
// Outputs: assign (B, N); sums (B, S, D) and counts (B, S), zero on entry.
template <typename T>
__global__ void kl_assign_accumulate_kernel(const T* __restrict__ g, const T* __restrict__ cconst,
                                            const int32_t* __restrict__ prev_counts, const T* __restrict__ x,
                                            int64_t B, int64_t N, int64_t S, int64_t D, int64_t* __restrict__ assign,
                                            T* __restrict__ sums, int32_t* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t p = warp; p < B * N; p += nwarps) {  // uniform within the warp
    const int64_t b = p / N;
    T score;
    long long best = kl_best_anchor(g + p * S, cconst + b * S, prev_counts + b * S, S, lane, 32, &score);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const T os = __shfl_xor_sync(0xffffffffu, score, off);
      const long long oi = __shfl_xor_sync(0xffffffffu, best, off);
      if (kl_better(os, static_cast<int64_t>(oi), score, static_cast<int64_t>(best))) {
        score = os;
        best = oi;
      }
    }
    if (best < 0) {  // no alive anchor: impossible for N > 0, kept safe
      if (lane == 0) assign[p] = 0;
      continue;
    }
    const T* xr = x + p * D;
    T* sr = sums + (b * S + best) * D;
    for (int64_t d = lane; d < D; d += 32) atomicAdd(sr + d, xr[d]);
    if (lane == 0) {
      atomicAdd(counts + b * S + best, 1);
      assign[p] = best;
    }
  }
}

}  // namespace kernels
}  // namespace weakseg
