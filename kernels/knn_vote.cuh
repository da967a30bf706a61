// CUDA bodies of knn_vote: merging one tile of similarities into every query's
// running top-k, and the vote.
//
// topk_merge_kernel: one thread block per query. The running list (sorted by
// knn_before) lives in shared memory; the block sweeps the tile in segments of
// SEG elements, collects the candidates that beat the current k-th entry into
// shared memory, and only when a segment produced any does it bitonic-sort the
// list plus the candidates and keep the first k. After the first tiles almost
// nothing beats the threshold, so the sweep is a single read of the tile.
#pragma once
#include <cstdint>
#include <cmath>

#include "kernels/common.h"
#include "kernels/knn_vote.h"

#ifndef WS_EXTERN_SHARED  // nvcc; the CPU emulator (csrc/emu/cuda_emu.h) defines its own
#define WS_EXTERN_SHARED(T, name) extern __shared__ T name[]
#endif

namespace weakseg {
namespace kernels {

constexpr int KNN_THREADS = 256;
constexpr int KNN_SEG = 1024;  // elements per segment = maximal candidates per merge

// Sort (v, i) pairs of length n (power of two) in shared memory by knn_before.
__device__ inline void bitonic_sort_pairs(float* v, int64_t* id, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < n; t += blockDim.x) {
        const int partner = t ^ stride;
        if (partner > t) {
          const bool ascending_block = ((t & size) == 0);
          // "ascending" here means ranked order (best first).
          const bool first_better = knn_before(v[t], id[t], v[partner], id[partner]);
          if (first_better != ascending_block) {
            const float tv = v[t]; v[t] = v[partner]; v[partner] = tv;
            const int64_t ti = id[t]; id[t] = id[partner]; id[partner] = ti;
          }
        }
      }
      __syncthreads();
    }
  }
}

// sims: (Q, tile) row-major, bank indices base .. base + tile - 1.
// top_v / top_i: (Q, k) running lists, initialised to (-inf, INT64_MAX).
// Shared memory: cap = next power of two >= k + KNN_SEG pairs.
__global__ void topk_merge_kernel(const float* __restrict__ sims, int64_t tile, int64_t base,
                                  float* __restrict__ top_v, int64_t* __restrict__ top_i, int64_t k, int cap) {
  WS_EXTERN_SHARED(unsigned char, smem_raw);  // extern __shared__ unsigned char smem_raw[];
  int64_t* sid = reinterpret_cast<int64_t*>(smem_raw);
  float* sv = reinterpret_cast<float*>(sid + cap);
  __shared__ int ncand;
  const int64_t q = blockIdx.x;
  const float* row = sims + q * tile;
  for (int t = threadIdx.x; t < k; t += blockDim.x) {
    sv[t] = top_v[q * k + t];
    sid[t] = top_i[q * k + t];
  }
  __syncthreads();
  for (int64_t s0 = 0; s0 < tile; s0 += KNN_SEG) {
    if (threadIdx.x == 0) ncand = 0;
    __syncthreads();
    const float thv = sv[k - 1];
    const int64_t thi = sid[k - 1];
    const int64_t s1 = s0 + KNN_SEG < tile ? s0 + KNN_SEG : tile;
    for (int64_t j = s0 + threadIdx.x; j < s1; j += blockDim.x) {
      const float s = knn_key(row[j]);
      if (knn_before(s, base + j, thv, thi)) {
        const int slot = atomicAdd(&ncand, 1);
        sv[k + slot] = s;
        sid[k + slot] = base + j;
      }
    }
    __syncthreads();
    const int nc = ncand;
    if (nc > 0) {
      int n = 1;
      while (n < k + nc) n <<= 1;
      for (int t = k + nc + threadIdx.x; t < n; t += blockDim.x) {
        sv[t] = -INFINITY;
        sid[t] = INT64_MAX;
      }
      __syncthreads();
      bitonic_sort_pairs(sv, sid, n);
    }
    __syncthreads();
  }
  for (int t = threadIdx.x; t < k; t += blockDim.x) {
    top_v[q * k + t] = sv[t];
    top_i[q * k + t] = sid[t];
  }
}

// One thread per query: gather the voters' labels and vote (votes and sums zeroed).
__global__ void vote_kernel(const float* __restrict__ top_v, const int64_t* __restrict__ top_i,
                            const int64_t* __restrict__ bank_labels, int64_t Q, int64_t k, int64_t num_classes,
                            int64_t* __restrict__ voter_labels, int64_t* __restrict__ votes,
                            float* __restrict__ sums, int64_t* __restrict__ out_label, float* __restrict__ out_conf) {
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < Q; q += (int64_t)gridDim.x * blockDim.x) {
    int64_t* vl = voter_labels + q * k;
    for (int64_t j = 0; j < k; ++j) vl[j] = bank_labels[top_i[q * k + j]];
    vote_one(top_v + q * k, vl, k, votes + q * num_classes, sums + q * num_classes, out_label + q, out_conf + q);
  }
}

}  // namespace kernels
}  // namespace weakseg
