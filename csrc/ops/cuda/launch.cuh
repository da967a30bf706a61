// Launch helpers shared by the CUDA launchers.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace weakseg {
namespace ops {
constexpr int kThreads = 256;
// Blocks for a grid-stride loop over `total` elements.
inline unsigned int grid_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, int64_t(1) << 20)));
}
}  // namespace ops
}  // namespace weakseg
