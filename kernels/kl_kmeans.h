// Framework-free pieces of kl_kmeans (k-means under the symmetric KL distance),
// shared by the CPU loops and the CUDA kernel so both pick the same anchor.
//
// The assignment step works on the expanded form of the distance. With
// x~ = max(x, 0) + eps and c~ likewise (eps ADDED to every entry, as the
// authors' kl_dis),
//   2 d(x, c) = sum_d (x~ - c~)(ln x~ - ln c~)
//             = sum x~ ln x~  +  [ sum c~ ln c~ - x~ . ln c~ - ln x~ . c~ ],
// and the first term does not depend on the anchor, so
//   argmin_c d(x, c) = argmin_c  cconst[c] - g[c],
// with cconst[c] = sum c~ ln c~ and g = [x~, ln x~] . [ln c~, c~] (one GEMM
// row). Dead anchors (no members in the previous iteration) are skipped;
// among equal scores the smaller anchor index wins; a NaN score ranks last.
// The expanded form cancels: its terms are of the size of sum x~ ln x~ while
// the gaps between two anchors' distances can be 1e-6 of the distance (sum-
// normalised attention maps), so the callers evaluate it in float64 (T =
// double); the direct form's terms are all >= 0 and need no such care.
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/common.h"

namespace weakseg {
namespace kernels {

constexpr double KL_EPS = 1e-5;  // added to every (non-negative) entry

// The comparable key of a score: NaN ranks after everything (as +inf).
template <typename T>
WS_HD T kl_key(T s) {
  return s != s ? static_cast<T>(INFINITY) : s;
}

// Candidate (s, i) beats the current best (bs, bi); bi < 0 means "no best yet".
template <typename T>
WS_HD bool kl_better(T s, int64_t i, T bs, int64_t bi) {
  if (bi < 0) return i >= 0;
  if (i < 0) return false;
  const T ks = kl_key(s), kb = kl_key(bs);
  return ks < kb || (ks == kb && i < bi);
}

// Best alive anchor among s = first, first + step, ... < S for one point:
// g_row (S) its GEMM row, cconst (S) the anchor constants, prev_counts (S)
// the member counts of the previous iteration (alive iff > 0). Returns the
// anchor index (-1 when none is alive in the range) and its score in *score.
template <typename T>
WS_HD int64_t kl_best_anchor(const T* g_row, const T* cconst, const int32_t* prev_counts, int64_t S, int64_t first,
                             int64_t step, T* score) {
  int64_t best = -1;
  T best_s = static_cast<T>(INFINITY);
  for (int64_t s = first; s < S; s += step) {
    if (prev_counts[s] <= 0) continue;
    const T v = cconst[s] - g_row[s];
    if (kl_better(v, s, best_s, best)) {
      best = s;
      best_s = v;
    }
  }
  *score = best_s;
  return best;
}

// Add one point's raw row x (D) to its anchor's running sum (D).
template <typename T>
WS_HD void kl_add_row(const T* x, int64_t D, T* sum_row) {
  for (int64_t d = 0; d < D; ++d) sum_row[d] += x[d];
}

// CPU loop, pass 1: the assignment of points [n0, n1) of one image
// (g: (N, S) GEMM rows of that image).
template <typename T>
inline void kl_assign_range(const T* g, const T* cconst, const int32_t* prev_counts, int64_t S, int64_t n0, int64_t n1,
                            int64_t* assign) {
  for (int64_t n = n0; n < n1; ++n) {
    T score;
    const int64_t a = kl_best_anchor(g + n * S, cconst, prev_counts, S, 0, 1, &score);
    assign[n] = a < 0 ? 0 : a;
  }
}

// CPU loop, pass 2: the member sums of columns [d0, d1) of one image, owned by
// the caller, accumulated in point order (deterministic whatever the thread
// count). x: (N, D) raw rows; sums: (S, D), zero on entry; counts (S) too
// when not null.
template <typename T>
inline void kl_accumulate_columns(const T* x, const int64_t* assign, int64_t N, int64_t D, int64_t d0, int64_t d1,
                                  T* sums, int32_t* counts) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t a = assign[n];
    kl_add_row(x + n * D + d0, d1 - d0, sums + a * D + d0);
    if (counts) counts[a] += 1;
  }
}

}  // namespace kernels
}  // namespace weakseg
