// CUDA bodies of refine_propagate and refine_propagate_qk.
//
// ers_rows_kernel   T' rows from attention rows and per-(row, column tile)
//                   partial row sums (reduced afterwards, deterministically).
// colmax_kernel     column maxima of the head-mean softmax attention from one
//                   block of logits (refine_propagate_qk's first pass).
// row_lse_kernel    log-sum-exp of every logit row (the softmax statistics).
// colnorm_kernel    one normalisation step: optional 1/r per row, minus the
//                   column minimum, divided by the column sum.
// bf16_mm_kernel    Y = M X for a bf16 P x P matrix M and a float32 P x K
//                   matrix X with float32 accumulation (the propagation steps
//                   of refine_propagate_qk, whose T' is held in bf16).
//
// Element loaders turn (row, column) into the attention value:
// DenseLoad reads a stored attention matrix; SoftmaxHeadsLoad recomputes the
// head-mean softmax from logits S (H, R, P) and their row log-sum-exp.
#pragma once
#include <cstdint>
#include <cfloat>
#include <limits>

#include "kernels/common.h"
#include "kernels/refine_propagate.h"

namespace weakseg {
namespace kernels {

constexpr int RP_THREADS = 256;  // threads per block; one column per thread in the row kernels
constexpr int RP_ROWS = 32;      // rows per block in the row kernels

template <typename in_t, typename acc_t>
struct DenseLoad {
  const in_t* a;  // (rows, P) row-major
  int64_t P;
  __device__ __forceinline__ acc_t operator()(int64_t i, int64_t j) const { return static_cast<acc_t>(a[i * P + j]); }
};

struct SoftmaxHeadsLoad {
  const float* s;    // (H, R, P) logits, scale already applied
  const float* lse;  // (H, R)
  int64_t H, R, P;
  float inv_heads;
  __device__ __forceinline__ float operator()(int64_t i, int64_t j) const {
    float v = 0.f;
    for (int64_t h = 0; h < H; ++h) v += __expf(s[(h * R + i) * P + j] - lse[h * R + i]);
    return v * inv_heads;
  }
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = MaxOp::apply(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_min(T v) {
  for (int o = 16; o > 0; o >>= 1) v = MinOp::apply(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction (blockDim.x a multiple of 32, <= 1024); every thread
// gets the result. `scratch` holds 32 values.
template <typename T, typename WarpOp>
__device__ __forceinline__ T block_reduce(T v, T* scratch, WarpOp op, T identity) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = op(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : identity;
  return op(v);
}

// Grid (ceil(P / RP_THREADS), ceil(rows / RP_ROWS)). Thread j of block
// (bx, by) computes column bx*RP_THREADS + j of rows by*RP_ROWS .. +RP_ROWS,
// writes T' (rounded to out_t) and, per row, the sum of its rounded entries
// over the block's columns into partial[row * gridDim.x + bx].
template <typename Load, typename acc_t, typename out_t>
__global__ void ers_rows_kernel(Load load, const acc_t* __restrict__ cmax, int64_t rows, int64_t P, acc_t lam,
                                acc_t t_lo, out_t* __restrict__ t, acc_t* __restrict__ partial) {
  __shared__ acc_t part[RP_ROWS][RP_THREADS / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * RP_THREADS + threadIdx.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * RP_ROWS;
  const acc_t cm = j < P ? cmax[j] : acc_t(0);
  for (int rr = 0; rr < RP_ROWS; ++rr) {
    const int64_t i = i0 + rr;
    if (i >= rows) break;  // uniform over the block
    acc_t v = 0;
    if (j < P) {
      if (cm > acc_t(0)) {
        const acc_t tv = load(i, j) / cm;
        if (tv > t_lo) v = lam == acc_t(0) ? tv : ers_entry(tv, acc_t(1), lam);
      }
      const out_t o = static_cast<out_t>(v);
      t[i * P + j] = o;
      v = static_cast<acc_t>(o);
    }
    v = warp_sum(v);
    if (lane == 0) part[rr][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < RP_ROWS && i0 + threadIdx.x < rows) {
    acc_t s = 0;
    for (int w = 0; w < RP_THREADS / 32; ++w) s += part[threadIdx.x][w];
    partial[(i0 + threadIdx.x) * gridDim.x + blockIdx.x] = s;
  }
}

// Same grid as ers_rows_kernel. cmax (P floats, >= 0) must start at 0; the
// attention values are >= 0, so their float bits order like ints.
template <typename Load>
__global__ void colmax_kernel(Load load, int64_t rows, int64_t P, float* __restrict__ cmax) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * RP_THREADS + threadIdx.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * RP_ROWS;
  if (j >= P) return;
  float m = 0.f;
  for (int rr = 0; rr < RP_ROWS && i0 + rr < rows; ++rr) m = fmaxf(m, load(i0 + rr, j));
  atomicMax(reinterpret_cast<int*>(cmax + j), __float_as_int(m));
}

// One block per row of s (n rows of length P): lse = max + log(sum exp(s - max)).
__global__ void row_lse_kernel(const float* __restrict__ s, int64_t P, float* __restrict__ lse) {
  __shared__ float scratch[32];
  const float* row = s + static_cast<int64_t>(blockIdx.x) * P;
  float m = -FLT_MAX;
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) m = fmaxf(m, row[j]);
  m = block_reduce(m, scratch, [](float v) { return warp_max(v); }, -FLT_MAX);
  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) acc += __expf(row[j] - m);
  acc = block_reduce(acc, scratch, [](float v) { return warp_sum(v); }, 0.f);
  if (threadIdx.x == 0) lse[blockIdx.x] = m + logf(acc);
}

// One block per column k of y (P, K): c[:, k] = (y' - min y') / sum(y' - min y'),
// y' = y / r per row when r is given. y and c may alias.
template <typename acc_t>
__global__ void colnorm_kernel(const acc_t* y, const acc_t* __restrict__ r, int64_t P, int64_t K, acc_t* c) {
  __shared__ acc_t scratch[32];
  const int64_t k = blockIdx.x;
  auto val = [&](int64_t i) { return r ? row_scaled(y[i * K + k], r[i]) : y[i * K + k]; };
  const acc_t big = std::numeric_limits<acc_t>::max();
  acc_t m = big;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) m = MinOp::apply(m, val(i));
  m = block_reduce(m, scratch, [](acc_t v) { return warp_min(v); }, big);
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) s += val(i) - m;
  s = block_reduce(s, scratch, [](acc_t v) { return warp_sum(v); }, acc_t(0));
  __syncthreads();  // every thread has read y before any writes c (they may alias)
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) c[i * K + k] = col_normalised(val(i), m, s);
}

// Y (P, K) = M (P, P, bf16) @ X (P, K) in float32. Grid (ceil(P / MM_ROWS),
// ceil(K / MM_COLS)), MM_THREADS threads: thread t owns output row t / 8 of the
// tile and columns t % 8 + 8 m, m < 4. Tiles of M and X go through shared memory.
constexpr int MM_ROWS = 32, MM_COLS = 32, MM_DEPTH = 64, MM_THREADS = 256;

template <typename m_t>
__global__ void bf16_mm_kernel(const m_t* __restrict__ M, const float* __restrict__ X, int64_t P, int64_t K,
                               float* __restrict__ Y) {
  __shared__ float ms[MM_ROWS][MM_DEPTH + 1];
  __shared__ float xs[MM_DEPTH][MM_COLS + 1];
  const int t = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * MM_ROWS;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * MM_COLS;
  const int lr = t / 8, kq = t % 8;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t j0 = 0; j0 < P; j0 += MM_DEPTH) {
    for (int e = t; e < MM_ROWS * MM_DEPTH; e += MM_THREADS) {
      const int rr = e / MM_DEPTH, jj = e % MM_DEPTH;
      const int64_t i = row0 + rr, j = j0 + jj;
      ms[rr][jj] = (i < P && j < P) ? static_cast<float>(M[i * P + j]) : 0.f;
    }
    for (int e = t; e < MM_DEPTH * MM_COLS; e += MM_THREADS) {
      const int jj = e / MM_COLS, kk = e % MM_COLS;
      const int64_t j = j0 + jj, kc = col0 + kk;
      xs[jj][kk] = (j < P && kc < K) ? X[j * K + kc] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < MM_DEPTH; ++jj) {
      const float m = ms[lr][jj];
#pragma unroll
      for (int u = 0; u < 4; ++u) acc[u] = fmaf(m, xs[jj][kq + 8 * u], acc[u]);
    }
    __syncthreads();
  }
  const int64_t i = row0 + lr;
  if (i < P) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t kc = col0 + kq + 8 * u;
      if (kc < K) Y[i * K + kc] = acc[u];
    }
  }
}

}  // namespace kernels
}  // namespace weakseg
