// Framework-free pieces of knn_vote: the ordering of candidates, the streaming
// top-k insertion of the CPU path, and the vote of one query (shared by the
// CPU loop and the CUDA kernel, so both break ties identically).
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/common.h"

namespace weakseg {
namespace kernels {

// Candidate a ranks before b: larger similarity first, then smaller bank index.
WS_HD bool knn_before(float sa, int64_t ia, float sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

// Insert (s, i) into the sorted list (vals, idx) of current length *len and
// capacity k. Candidates arrive in ascending bank index, so an equal
// similarity never displaces an entry already kept.
inline void topk_insert(float* vals, int64_t* idx, int64_t* len, int64_t k, float s, int64_t i) {
  int64_t n = *len;
  if (n == k) {
    if (!knn_before(s, i, vals[k - 1], idx[k - 1])) return;
    n = k - 1;
  }
  int64_t pos = n;
  while (pos > 0 && knn_before(s, i, vals[pos - 1], idx[pos - 1])) {
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  vals[pos] = s;
  idx[pos] = i;
  *len = n + 1;
}

// NaN similarities rank last, like -inf (every backend and the reference agree).
WS_HD float knn_key(float s) { return s != s ? -INFINITY : s; }

// The vote of one query over its `k` voters, given in rank order (most
// similar first): votes_row[c] counts the voters of class c; the winner has
// most votes, then the larger sum of its voters' similarities (summed in rank
// order), then the smaller class id; confidence is the mean similarity of the
// winner's voters. With no voter the label is -1 and the confidence 0.
// votes_row and sums_row (num_classes each) must be zero on entry; O(k) work.
WS_HD void vote_one(const float* sims, const int64_t* labels, int64_t k, int64_t* votes_row, float* sums_row,
                    int64_t* out_label, float* out_conf) {
  for (int64_t i = 0; i < k; ++i) {
    votes_row[labels[i]] += 1;
    sums_row[labels[i]] += sims[i];
  }
  int64_t best_label = -1, best_count = 0;
  float best_sum = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t c = labels[i];
    const int64_t count = votes_row[c];
    const float sum = sums_row[c];
    if (best_label < 0 || count > best_count || (count == best_count && sum > best_sum) ||
        (count == best_count && sum == best_sum && c < best_label)) {
      best_label = c;
      best_count = count;
      best_sum = sum;
    }
  }
  *out_label = best_label;
  *out_conf = best_count > 0 ? best_sum / static_cast<float>(best_count) : 0.f;
}

}  // namespace kernels
}  // namespace weakseg
