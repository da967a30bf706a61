// The kl_kmeans op's sources compiled for the CPU emulator: its input checks and
// shared helpers (csrc/ops/kl_kmeans.cpp) and its CUDA launcher with the kernel
// bodies it includes (csrc/ops/cuda/kl_kmeans.cu), unchanged.
#include "csrc/emu/cuda_emu.h"
#include "csrc/emu/unregistered.h"

#include "csrc/ops/kl_kmeans.cpp"
#include "csrc/ops/cuda/kl_kmeans.cu"
