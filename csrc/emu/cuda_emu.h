// cuda_emu.h — runs this project's CUDA kernels (kernels/*.cuh) and launchers
// (csrc/ops/cuda/*.cu), the very source nvcc compiles, on the CPU with g++.
//
// What it runs, and how
//   * Every CUDA thread of a block is a thread of execution of its own: an OS
//     thread (mode "threads": real concurrency, what TSan/ASan need) or a
//     fiber, i.e. a ucontext coroutine with its own stack (mode "fibers", the
//     default: one OS thread switches between the CUDA threads at every
//     barrier / shuffle, the faster one). Blocks run one at a time, in a
//     shuffled order; in "fibers" mode the threads are also resumed in a
//     shuffled order after every barrier, in "threads" mode they start after
//     random yields. Mode and seed: configure(), or the environment
//     variables WEAKSEG_EMU_MODE and WEAKSEG_EMU_SEED.
//   * __syncthreads() is a barrier of all threads of the block that checks
//     divergence: threads waiting at different __syncthreads (call sites), or
//     a thread that has returned while others wait at one, is an error (the
//     launch throws; the op raises RuntimeError). So is a deadlock.
//   * __shfl_xor_sync / __shfl_sync / __shfl_down_sync: a rendezvous of the
//     32 lanes of the warp (full warps and the full mask only; a lane that has
//     returned or waits elsewhere is an error).
//   * Static __shared__ variables are function statics: one instance per
//     kernel (instantiation), shared by the threads of the running block
//     (blocks run one at a time). Dynamic shared memory (WS_EXTERN_SHARED) is
//     a buffer of exactly the launch's size, filled with 0xFF at every block
//     start (reads past it are caught by ASan, reads before writes give NaN /
//     -1).
//   * Atomics (atomicAdd on int / unsigned / unsigned long long / float /
//     double, atomicMax on int / unsigned / long long) are GCC __atomic
//     operations on the object itself, so TSan sees them as atomics.
//   * Launch limits checked: block <= 1024 threads, grid.y/z <= 65535,
//     grid.x < 2^31, dynamic shared memory <= 48 KiB (the default limit).
//   * Host side: the launchers run unchanged on CPU tensors; their cuBLAS
//     calls are at::mm / at::bmm on CPU tensors, c10::cuda streams, guards and
//     C10_CUDA_KERNEL_LAUNCH_CHECK are inert shims (the guard checks that the
//     tensors are on the CPU).
//
// What it cannot see
//   * True concurrency and scheduling: warps do not run in lock step, no
//     instruction-level interleaving of warps within a fiber phase, so a race
//     shows only as an order dependence (fibers) or under TSan (threads).
//   * Memory coherence and fences between blocks (blocks never overlap here),
//     the memory model of the GPU (weak ordering, __threadfence), L1/L2.
//   * Warp-synchronous code without __syncwarp (implicit lock step), and
//     independent thread scheduling effects; partial-mask shuffles.
//   * Occupancy, registers, static shared memory limits, launch limits beyond
//     the ones above, bank conflicts, real timing.
//   * Numerics of the hardware: __expf is expf (the GPU's is approximate),
//     fused multiply-add contraction by nvcc, bf16 / TF32 tensor-core
//     rounding; cuBLAS (and its TF32 setting) is replaced by the CPU GEMM.
//   * Uninitialised reads of static __shared__ memory: it keeps the values
//     of the previous block (only dynamic shared memory is poisoned).
//   * Under TSan, every race the code admits: the emulator's own lock orders
//     the threads at every barrier and shuffle, so a race between warps is
//     reported only when the run interleaves it.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>

#define WEAKSEG_CUDA_EMU 1

// ---- CUDA language keywords ----------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A static __shared__ variable: one per kernel, used by one block at a time.
#define __shared__ static
// Dynamic shared memory (`extern __shared__ T name[]` under nvcc).
#define WS_EXTERN_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::detail::dynamic_smem())

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct CUstream_st*;

namespace emu {

// configure(): mode "fibers" (default) or "threads"; seed of the block and
// thread orders. stats(): counters since the last reset_stats().
void configure(const std::string& mode, int64_t seed);
struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0, shuffles = 0;
};
Stats stats();
void reset_stats();

namespace detail {

struct Block;
struct Thread {
  dim3 idx;
  int linear = 0;
  Block* block = nullptr;
};
// The CUDA thread running on this OS thread (fibers: switched by the scheduler).
extern thread_local Thread* current;

struct Block {
  dim3 bidx, bdim, gdim;  // blockIdx, blockDim, gridDim
  unsigned char* dyn_smem = nullptr;
};

unsigned char* dynamic_smem();
void syncthreads(const char* file, int line);
// Exchange of 8-byte words between the lanes of the calling warp: the caller
// publishes `mine` and gets the word of lane `src` (every lane must call with
// the same site; src outside the warp gives the caller's own word).
uint64_t warp_exchange(uint64_t mine, int src, unsigned int mask, int line);

// Runs `body` for every thread of every block (blocks one at a time).
void run_grid(const char* name, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx);

template <typename T>
inline T shfl_src(T v, int src, unsigned int mask, int line) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof(T));
  w = warp_exchange(w, src, mask, line);
  T out;
  std::memcpy(&out, &w, sizeof(T));
  return out;
}
inline int lane_id() { return current->linear & 31; }

}  // namespace detail

// A kernel launch: `call` is a generic lambda that calls the kernel with the
// arguments (so template arguments are deduced as nvcc does for <<<>>>); the
// arguments are copied once per launch and once more per thread, into the
// kernel's by-value parameters.
template <typename F>
struct Launch {
  dim3 grid, block;
  size_t smem;
  const char* name;
  F call;
  template <typename... A>
  void operator()(A&&... args) const {
    using Params = std::tuple<std::decay_t<A>...>;
    Params params(std::forward<A>(args)...);
    struct Ctx {
      const F* call;
      const Params* params;
    } ctx{&call, &params};
    detail::run_grid(
        name, grid, block, smem,
        [](void* c) {
          auto* x = static_cast<Ctx*>(c);
          Params copy = *x->params;
          std::apply(*x->call, copy);
        },
        &ctx);
  }
};
template <typename S, typename F>
Launch<F> make_launch(dim3 grid, dim3 block, size_t smem, const S& /*stream: one queue*/, const char* name, F call) {
  return Launch<F>{grid, block, smem, name, call};
}

}  // namespace emu

#define threadIdx (::emu::detail::current->idx)
#define blockIdx (::emu::detail::current->block->bidx)
#define blockDim (::emu::detail::current->block->bdim)
#define gridDim (::emu::detail::current->block->gdim)
#define __syncthreads() ::emu::detail::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lm, ...) \
  ::emu::detail::shfl_src((v), ::emu::detail::lane_id() ^ (lm), (mask), __LINE__)
#define __shfl_sync(mask, v, src, ...) ::emu::detail::shfl_src((v), (src), (mask), __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::emu::detail::shfl_src((v), ::emu::detail::lane_id() + (d), (mask), __LINE__)

// ---- device functions ------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

template <typename T>
inline T ws_emu_atomic_add_int(T* p, T v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline int atomicAdd(int* p, int v) { return ws_emu_atomic_add_int(p, v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return ws_emu_atomic_add_int(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return ws_emu_atomic_add_int(p, v);
}
template <typename F>
inline F ws_emu_atomic_add_float(F* p, F v) {
  F old, want;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do {
    want = old + v;
  } while (!__atomic_compare_exchange(p, &old, &want, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
inline float atomicAdd(float* p, float v) { return ws_emu_atomic_add_float(p, v); }
inline double atomicAdd(double* p, double v) { return ws_emu_atomic_add_float(p, v); }
template <typename T>
inline T ws_emu_atomic_max(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline int atomicMax(int* p, int v) { return ws_emu_atomic_max(p, v); }
inline unsigned int atomicMax(unsigned int* p, unsigned int v) { return ws_emu_atomic_max(p, v); }
inline long long atomicMax(long long* p, long long v) { return ws_emu_atomic_max(p, v); }

// ---- the host API the launchers use ------------------------------------------
namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
// The emulated launchers run on CPU tensors.
struct CUDAGuard {
  explicit CUDAGuard(c10::Device d) {
    TORCH_CHECK(d.is_cpu(), "weakseg CUDA emulator: expected CPU tensors, got ", d);
  }
};
}  // namespace cuda
}  // namespace c10
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
