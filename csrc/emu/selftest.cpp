// Small kernels that check the emulator itself (tests/test_cuda_emu.py):
// shuffles, shared memory with barriers, atomics, and the errors it must
// report (divergent barriers, a thread that returns while others wait, a lane
// that returns while its warp shuffles, partial warps).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "csrc/emu/cuda_emu.h"
#include "csrc/ops/cuda/launch.cuh"

namespace {

// out[t] = sum of the lane ids of the warp (butterfly), out[n + t] = lane + 1's id (shfl_down).
__global__ void shuffle_kernel(int64_t* out) {
  const int lane = threadIdx.x & 31;
  int s = lane;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  const double d = __shfl_down_sync(0xffffffffu, static_cast<double>(lane), 1);
  out[threadIdx.x] = s;
  out[blockDim.x + threadIdx.x] = static_cast<int64_t>(d);
}

// Block sums through shared memory (two barriers per step) and one atomic total.
__global__ void shared_sum_kernel(const float* in, float* block_sums, float* total, int* count) {
  __shared__ float buf[256];
  const int t = threadIdx.x;
  buf[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t == 0) block_sums[blockIdx.x] = buf[0];
  atomicAdd(total, in[blockIdx.x * blockDim.x + t]);
  atomicAdd(count, 1);
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_at_barrier_kernel(int* out) {
  if (threadIdx.x % 2) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void lane_exit_shuffle_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void dynamic_smem_kernel(int* out) {
  WS_EXTERN_SHARED(int, dyn);
  out[threadIdx.x] = dyn[threadIdx.x];  // uninitialised: the emulator's poison
  __syncthreads();
  dyn[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[blockDim.x + threadIdx.x] = dyn[blockDim.x - 1 - threadIdx.x];
}

std::vector<at::Tensor> selftest(std::string name) {
  const auto li = at::TensorOptions().dtype(at::kLong);
  const auto ii = at::TensorOptions().dtype(at::kInt);
  if (name == "shuffle") {
    auto out = at::zeros({2 * 64}, li);
    WS_LAUNCH(2, 64, 0, 0, shuffle_kernel)(out.data_ptr<int64_t>());
    return {out};
  }
  if (name == "shared_sum") {
    auto in = at::arange(4 * 256, at::TensorOptions().dtype(at::kFloat));
    auto sums = at::zeros({4}, in.options());
    auto total = at::zeros({1}, in.options());
    auto count = at::zeros({1}, ii);
    WS_LAUNCH(4, 256, 0, 0, shared_sum_kernel)(in.data_ptr<float>(), sums.data_ptr<float>(), total.data_ptr<float>(),
                                                count.data_ptr<int>());
    return {sums, total, count};
  }
  if (name == "dynamic_smem") {
    auto out = at::zeros({2 * 64}, ii);
    WS_LAUNCH(1, 64, 64 * sizeof(int), 0, dynamic_smem_kernel)(out.data_ptr<int>());
    return {out};
  }
  auto out = at::zeros({64}, ii);
  if (name == "divergent_barrier") {
    WS_LAUNCH(1, 64, 0, 0, divergent_barrier_kernel)(out.data_ptr<int>());
  } else if (name == "exit_at_barrier") {
    WS_LAUNCH(1, 64, 0, 0, exit_at_barrier_kernel)(out.data_ptr<int>());
  } else if (name == "lane_exit_shuffle") {
    WS_LAUNCH(1, 64, 0, 0, lane_exit_shuffle_kernel)(out.data_ptr<int>());
  } else if (name == "partial_warp_shuffle") {
    WS_LAUNCH(1, 48, 0, 0, lane_exit_shuffle_kernel)(out.data_ptr<int>());
  } else if (name == "smem_limit") {
    WS_LAUNCH(1, 64, 48 * 1024 + 1, 0, dynamic_smem_kernel)(out.data_ptr<int>());
  } else if (name == "block_too_large") {
    WS_LAUNCH(1, 1025, 0, 0, divergent_barrier_kernel)(out.data_ptr<int>());
  } else {
    TORCH_CHECK(false, "unknown selftest ", name);
  }
  return {out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(weakseg_emu, m) { m.def("selftest(str name) -> Tensor[]", &selftest); }
