// Framework-free helpers shared by the CPU loops and the CUDA kernels.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define WS_HD __host__ __device__ __forceinline__
#else
#define WS_HD inline
#endif

namespace weakseg {
namespace kernels {

struct MinOp {
  template <typename T>
  WS_HD static T apply(T a, T b) { return b < a ? b : a; }
};
struct MaxOp {
  template <typename T>
  WS_HD static T apply(T a, T b) { return a < b ? b : a; }
};

// Integer ceil-division.
WS_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The bins of torch's adaptive_avg_pool: output cell i of n over an input
// extent of size `in` covers [floor(i*in/n), ceil((i+1)*in/n)).
WS_HD int64_t adaptive_start(int64_t i, int64_t n, int64_t in) { return (i * in) / n; }
WS_HD int64_t adaptive_end(int64_t i, int64_t n, int64_t in) { return ((i + 1) * in + n - 1) / n; }

}  // namespace kernels
}  // namespace weakseg
