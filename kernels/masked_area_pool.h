// Patch weights of Soft-Masked Feature Aggregation: the covered fraction of
// every patch of an h x w grid by a mask at pixel resolution H x W, with the
// bins of adaptive_avg_pool2d (which may overlap when H is not a multiple of h).
// One pass over the mask: each output row's pixel rows are summed column-wise
// once, then the column sums are reduced per output column.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/common.h"

namespace weakseg {
namespace kernels {

// MaskT is uint8_t (bool / binary uint8: nonzero counts as 1) or float/double.
template <typename MaskT>
WS_HD float mask_value(MaskT v) { return static_cast<float>(v); }
template <>
WS_HD float mask_value<uint8_t>(uint8_t v) { return v ? 1.f : 0.f; }

// One mask plane (H x W) -> weights (h x w). colsum: scratch of W floats.
template <typename MaskT>
void patch_weights_plane(const MaskT* mask, int64_t H, int64_t W, int64_t h, int64_t w, float* out,
                         std::vector<float>& colsum) {
  colsum.resize(static_cast<size_t>(W));
  for (int64_t i = 0; i < h; ++i) {
    const int64_t y0 = adaptive_start(i, h, H), y1 = adaptive_end(i, h, H);
    std::fill(colsum.begin(), colsum.end(), 0.f);
    for (int64_t y = y0; y < y1; ++y) {
      const MaskT* row = mask + y * W;
      for (int64_t x = 0; x < W; ++x) colsum[x] += mask_value<MaskT>(row[x]);
    }
    const float rows = static_cast<float>(y1 - y0);
    for (int64_t j = 0; j < w; ++j) {
      const int64_t x0 = adaptive_start(j, w, W), x1 = adaptive_end(j, w, W);
      float s = 0.f;
      for (int64_t x = x0; x < x1; ++x) s += colsum[x];
      out[i * w + j] = s / (rows * static_cast<float>(x1 - x0));
    }
  }
}

}  // namespace kernels
}  // namespace weakseg
