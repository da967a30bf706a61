// CUDA bodies of the separable van Herk / Gil-Werman min/max filters (see
// erode.h for the block decomposition). A pass filters `L` lines of `n`
// elements per plane; element i of line l of plane p lives at
// base + p*plane_stride + l*ls + i*es, so the same kernels do the vertical pass
// (lines = columns, ls = 1, es = W: adjacent threads read adjacent columns,
// coalesced) and the horizontal pass (lines = rows, ls = W, es = 1).
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace weakseg {
namespace kernels {

// Pass 1: for each (plane, block b, line l) one thread computes the running
// reductions of its k-element block of the extended line into G and Hs
// (layout [plane][e][l], so the writes of adjacent lines are coalesced).
template <typename T, typename Op>
__global__ void vanherk_blocks_kernel(const T* __restrict__ in, T* __restrict__ G, T* __restrict__ Hs,
                                      int64_t planes, int64_t L, int64_t n, int64_t plane_stride,
                                      int64_t ls, int64_t es, int64_t r, T identity) {
  const int64_t k = 2 * r + 1;
  const int64_t m = n + 2 * r;
  const int64_t nblocks = ceil_div(m, k);
  const int64_t total = planes * nblocks * L;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t l = t % L;
    const int64_t b = (t / L) % nblocks;
    const int64_t p = t / (L * nblocks);
    const T* src = in + p * plane_stride + l * ls;
    T* g = G + p * m * L + l;
    T* h = Hs + p * m * L + l;
    const int64_t e0 = b * k;
    const int64_t e1 = e0 + k < m ? e0 + k : m;
    T acc = identity;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t i = e - r;
      const T v = (i >= 0 && i < n) ? src[i * es] : identity;
      acc = Op::apply(acc, v);
      g[e * L] = acc;
    }
    acc = identity;
    for (int64_t e = e1 - 1; e >= e0; --e) {
      const int64_t i = e - r;
      const T v = (i >= 0 && i < n) ? src[i * es] : identity;
      acc = Op::apply(acc, v);
      h[e * L] = acc;
    }
  }
}

// Pass 2: out[i] = op(Hs[i], G[i + k - 1]) for every element.
template <typename T, typename Op>
__global__ void vanherk_combine_kernel(const T* __restrict__ G, const T* __restrict__ Hs, T* __restrict__ out,
                                       int64_t planes, int64_t L, int64_t n, int64_t plane_stride,
                                       int64_t ls, int64_t es, int64_t r) {
  const int64_t k = 2 * r + 1;
  const int64_t m = n + 2 * r;
  const int64_t total = planes * n * L;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t l = t % L;
    const int64_t i = (t / L) % n;
    const int64_t p = t / (L * n);
    const T* g = G + p * m * L + l;
    const T* h = Hs + p * m * L + l;
    out[p * plane_stride + l * ls + i * es] = Op::apply(h[i * L], g[(i + k - 1) * L]);
  }
}

// erode_labels: keep the label where the window's min equals its max.
template <typename T>
__global__ void labels_keep_kernel(const T* __restrict__ in, const T* __restrict__ mn, const T* __restrict__ mx,
                                   T* __restrict__ out, int64_t total, T ignore_value) {
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
       t += (int64_t)gridDim.x * blockDim.x) {
    out[t] = (mn[t] == mx[t]) ? in[t] : ignore_value;
  }
}

}  // namespace kernels
}  // namespace weakseg
