// CUDA body of the patch weights of masked_area_pool (see masked_area_pool.h).
// One thread per output patch (plane, i, j); adjacent threads own adjacent
// bins of the same pixel rows, so a warp sweeps a contiguous run of each row
// and every mask byte comes from DRAM once (the overlap of adjacent adaptive
// bins is served from L1).
#pragma once
#include <cstdint>

#include "kernels/common.h"
#include "kernels/masked_area_pool.h"

namespace weakseg {
namespace kernels {

template <typename MaskT>
__global__ void patch_weights_kernel(const MaskT* __restrict__ masks, float* __restrict__ out, int64_t planes,
                                     int64_t H, int64_t W, int64_t h, int64_t w) {
  const int64_t total = planes * h * w;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = t % w;
    const int64_t i = (t / w) % h;
    const int64_t p = t / (w * h);
    const int64_t y0 = adaptive_start(i, h, H), y1 = adaptive_end(i, h, H);
    const int64_t x0 = adaptive_start(j, w, W), x1 = adaptive_end(j, w, W);
    const MaskT* m = masks + p * H * W;
    float s = 0.f;
    for (int64_t y = y0; y < y1; ++y) {
      const MaskT* row = m + y * W;
      for (int64_t x = x0; x < x1; ++x) s += mask_value<MaskT>(row[x]);
    }
    out[t] = s / static_cast<float>((y1 - y0) * (x1 - x0));
  }
}

}  // namespace kernels
}  // namespace weakseg
