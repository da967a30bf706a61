// The masked_area_pool op's sources compiled for the CPU emulator: its input checks and
// shared helpers (csrc/ops/masked_area_pool.cpp) and its CUDA launcher with the kernel
// bodies it includes (csrc/ops/cuda/masked_area_pool.cu), unchanged.
#include "csrc/emu/cuda_emu.h"
#include "csrc/emu/unregistered.h"

#include "csrc/ops/masked_area_pool.cpp"
#include "csrc/ops/cuda/masked_area_pool.cu"
