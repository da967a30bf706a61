// The erode op's sources compiled for the CPU emulator: its input checks and
// shared helpers (csrc/ops/erode.cpp) and its CUDA launcher with the kernel
// bodies it includes (csrc/ops/cuda/erode.cu), unchanged.
#include "csrc/emu/cuda_emu.h"
#include "csrc/emu/unregistered.h"

#include "csrc/ops/erode.cpp"
#include "csrc/ops/cuda/erode.cu"
