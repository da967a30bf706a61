// Launch helpers shared by the CUDA launchers.
#pragma once
#ifdef WEAKSEG_CUDA_EMU
// The launchers compiled as C++ against the CPU emulator (csrc/emu/cuda_emu.h).
#include "csrc/emu/cuda_emu.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cstdint>

// WS_LAUNCH(grid, block, smem, stream, kernel)(args...) is
// kernel<<<grid, block, smem, stream>>>(args...) under nvcc, and a launch on
// the CPU emulator (emu::Launch) in the emulator build. The kernel comes last
// so that template arguments with commas need no parentheses.
#ifdef WEAKSEG_CUDA_EMU
#define WS_LAUNCH(grid, block, smem, stream, ...) \
  ::emu::make_launch((grid), (block), (smem), (stream), #__VA_ARGS__, [](auto&... ws_a) { __VA_ARGS__(ws_a...); })
#else
#define WS_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

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
