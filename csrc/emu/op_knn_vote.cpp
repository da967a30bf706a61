// The knn_vote op's sources compiled for the CPU emulator: its input checks and
// shared helpers (csrc/ops/knn_vote.cpp) and its CUDA launcher with the kernel
// bodies it includes (csrc/ops/cuda/knn_vote.cu), unchanged.
#include "csrc/emu/cuda_emu.h"
#include "csrc/emu/unregistered.h"

#include "csrc/ops/knn_vote.cpp"
#include "csrc/ops/cuda/knn_vote.cu"
