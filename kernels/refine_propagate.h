// Framework-free bodies of refine_propagate (iSeg's entropy-reduced
// self-attention and N-step propagation), shared by the CPU loops and the CUDA
// kernels.
//
// The contract (docs/design.md op 5) builds, from attention A (rows = queries),
//   T  = A / colmax(A);  T = T + ent*log10(e*T) where T > 0;  T = max(T, 0)
//   Pm = T / rowsum(T)
// and repeats C = Pm @ C; C = C - colmin(C); C = C / colsum(C).
// The kernels never form Pm: they keep T' (the clamped T) and its row sums r
// and apply 1/r to the product, (T' C) / r == Pm C. Each step then costs one
// read of T'.
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/common.h"

namespace weakseg {
namespace kernels {

WS_HD float ws_log(float x) { return logf(x); }
WS_HD double ws_log(double x) { return log(x); }

// ent*log10(e*t) == lam*(1 + ln t) with lam = ent / ln(10).
template <typename T>
WS_HD T ers_lambda(double ent) { return static_cast<T>(ent / 2.302585092994045684); }

// One entry of T': a is the attention value, cmax its column's maximum over
// the queries. Columns without a positive entry, and entries <= 0 (or NaN),
// give 0; 0 stays 0 (the reference leaves T == 0 untouched).
template <typename T>
WS_HD T ers_entry(T a, T cmax, T lam) {
  if (!(cmax > T(0))) return T(0);
  const T t = a / cmax;
  if (!(t > T(0))) return T(0);
  const T v = t + lam * (T(1) + ws_log(t));
  return v > T(0) ? v : T(0);
}

// One row of the propagated product after the row-stochastic scaling:
// (T' C)_i / r_i, with rows whose T' row is all zero giving 0.
template <typename T>
WS_HD T row_scaled(T y, T r) { return r > T(0) ? y / r : T(0); }

// The normalisation of one column after its minimum m and the sum s of
// (x - m) are known: (x - m) / s, and 0 for a column whose sum is 0.
template <typename T>
WS_HD T col_normalised(T x, T m, T s) { return s > T(0) ? (x - m) / s : T(0); }

}  // namespace kernels
}  // namespace weakseg
