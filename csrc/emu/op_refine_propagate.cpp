// The refine_propagate op's sources compiled for the CPU emulator: its input checks and
// shared helpers (csrc/ops/refine_propagate.cpp) and its CUDA launcher with the kernel
// bodies it includes (csrc/ops/cuda/refine_propagate.cu), unchanged.
#include "csrc/emu/cuda_emu.h"
#include "csrc/emu/unregistered.h"

#include "csrc/ops/refine_propagate.cpp"
#include "csrc/ops/cuda/refine_propagate.cu"
