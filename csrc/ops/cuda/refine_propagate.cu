// CUDA launchers of refine_propagate and refine_propagate_qk.
//
// refine_propagate: per batch element, column maxima (one reduction), one
// kernel that writes T' into the one P x P buffer with per-tile row sums, then
// `steps` x (cuBLAS GEMM T' C, one normalisation kernel that applies 1/r).
//
// refine_propagate_qk: the attention is never stored in float32. The logits of
// a block of R query rows (H x R x P floats, at most 8 MiB) are recomputed with
// one batched GEMM in each of two passes: the first takes the softmax
// statistics and the column maxima, the second writes T' in bf16 (32 MiB at
// P = 4096) with row sums of the rounded values. The steps run a bf16 x fp32
// GEMM kernel with float32 accumulation.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "csrc/ops/common.h"
#include "csrc/ops/cuda/launch.cuh"
#include "csrc/ops/refine_propagate.h"
#include "kernels/refine_propagate.cuh"

namespace weakseg {
namespace ops {

namespace {

dim3 row_grid(int64_t rows, int64_t P) {
  return dim3(static_cast<unsigned int>(kernels::ceil_div(P, kernels::RP_THREADS)),
              static_cast<unsigned int>(kernels::ceil_div(rows, kernels::RP_ROWS)));
}

int64_t col_tiles(int64_t P) { return kernels::ceil_div(P, kernels::RP_THREADS); }

template <typename acc_t>
void colnorm(const at::Tensor& y, const acc_t* r, at::Tensor& c, cudaStream_t stream) {
  const int64_t P = y.size(0), K = y.size(1);
  WS_LAUNCH(static_cast<unsigned int>(K), 512, 0, stream, kernels::colnorm_kernel<acc_t>)(
      y.const_data_ptr<acc_t>(), r, P, K, c.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor refine_propagate_cuda(const at::Tensor& attn, const at::Tensor& maps, double ent, int64_t steps) {
  c10::cuda::CUDAGuard guard(attn.device());
  check_refine_args(attn, maps, ent, steps);
  const int64_t B = attn.size(0), P = attn.size(1), K = maps.size(2);
  const auto ct = refine_compute_type(attn);
  auto out = at::zeros({B, P, K}, attn.options().dtype(ct));
  if (B == 0 || P == 0 || K == 0) return out;
  WS_CHECK(kernels::ceil_div(P, kernels::RP_ROWS) <= 65535, "refine_propagate", "P must be <= ",
           65535 * kernels::RP_ROWS, " on CUDA, got ", P);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto a = attn.contiguous();
  auto mp = maps.to(ct).contiguous();
  auto t = at::empty({P, P}, out.options());  // the one P x P buffer
  auto partial = at::empty({P, col_tiles(P)}, out.options());
  auto y = at::empty({P, K}, out.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "refine_propagate_cuda", [&] {
    using acc_t = scalar_t;
    const acc_t lam = kernels::ers_lambda<acc_t>(ent);
    const acc_t t_lo = static_cast<acc_t>(refine_threshold(ent));
    for (int64_t b = 0; b < B; ++b) {
      auto ab = a[b];
      auto cmax = at::amax(ab, {0}).to(ct).contiguous();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "refine_propagate_ers", [&] {
        kernels::DenseLoad<scalar_t, acc_t> load{ab.const_data_ptr<scalar_t>(), P};
        WS_LAUNCH(row_grid(P, P), kernels::RP_THREADS, 0, stream, kernels::ers_rows_kernel)(
            load, cmax.const_data_ptr<acc_t>(), P, P, lam, t_lo, t.data_ptr<acc_t>(), partial.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      auto r = at::sum(partial, {1}).contiguous();
      auto c = out[b];
      colnorm<acc_t>(mp[b], nullptr, c, stream);
      for (int64_t s = 0; s < steps; ++s) {
        at::mm_out(y, t, c);
        colnorm<acc_t>(y, r.const_data_ptr<acc_t>(), c, stream);
      }
    }
  });
  return out;
}

at::Tensor refine_propagate_qk_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& maps, double ent,
                                    int64_t steps, double scale) {
  c10::cuda::CUDAGuard guard(q.device());
  check_refine_qk_args(q, k, maps, ent, steps, scale);
  const int64_t B = q.size(0), H = q.size(1), P = q.size(2), K = maps.size(2);
  // On CUDA the propagation runs in float32 with T' in bf16, whatever the input dtype.
  auto opts = q.options().dtype(at::kFloat);
  auto out = at::zeros({B, P, K}, opts);
  if (B == 0 || P == 0 || K == 0) return out;
  WS_CHECK(kernels::ceil_div(P, kernels::RP_ROWS) <= 65535, "refine_propagate_qk", "P must be <= ",
           65535 * kernels::RP_ROWS, " on CUDA, got ", P);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto qs = at::mul(q.to(at::kFloat), at::Scalar(scale)).contiguous();
  auto ks = k.to(at::kFloat).contiguous();
  auto mp = maps.to(at::kFloat).contiguous();
  // Logits of R query rows at a time: H * R * P floats <= 8 MiB.
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(P, (int64_t(1) << 21) / (H * P)));
  auto s = at::empty({H, R, P}, opts);
  auto lse = at::empty({H, R}, opts);
  auto t = at::empty({P, P}, q.options().dtype(at::kBFloat16));
  auto cmax = at::empty({P}, opts);
  auto partial = at::empty({P, col_tiles(P)}, opts);
  auto y = at::empty({P, K}, opts);
  const float lam = kernels::ers_lambda<float>(ent);
  const float t_lo = static_cast<float>(refine_threshold(ent));
  const float inv_heads = 1.f / static_cast<float>(H);

  for (int64_t b = 0; b < B; ++b) {
    auto kt = ks[b].transpose(1, 2);
    cmax.zero_();
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t r0 = 0; r0 < P; r0 += R) {
        const int64_t n = std::min(R, P - r0);
        auto sb = s.narrow(1, 0, n);  // (H, n, P); contiguous only when n == R
        if (n != R) sb = at::empty({H, n, P}, opts);
        at::bmm_out(sb, qs[b].narrow(1, r0, n), kt);
        WS_LAUNCH(static_cast<unsigned int>(H * n), kernels::RP_THREADS, 0, stream, kernels::row_lse_kernel)(
            sb.const_data_ptr<float>(), P, lse.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        kernels::SoftmaxHeadsLoad load{sb.const_data_ptr<float>(), lse.const_data_ptr<float>(), H, n, P, inv_heads};
        if (pass == 0) {
          WS_LAUNCH(row_grid(n, P), kernels::RP_THREADS, 0, stream, kernels::colmax_kernel)(load, n, P,
                                                                                    cmax.data_ptr<float>());
        } else {
          WS_LAUNCH(row_grid(n, P), kernels::RP_THREADS, 0, stream, kernels::ers_rows_kernel)(
              load, cmax.const_data_ptr<float>(), n, P, lam, t_lo,
              t.data_ptr<at::BFloat16>() + r0 * P, partial.data_ptr<float>() + r0 * col_tiles(P));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    auto r = at::sum(partial, {1}).contiguous();
    auto c = out[b];
    colnorm<float>(mp[b], nullptr, c, stream);
    const dim3 mm_grid(static_cast<unsigned int>(kernels::ceil_div(P, kernels::MM_ROWS)),
                       static_cast<unsigned int>(kernels::ceil_div(K, kernels::MM_COLS)));
    for (int64_t st = 0; st < steps; ++st) {
      WS_LAUNCH(mm_grid, kernels::MM_THREADS, 0, stream, kernels::bf16_mm_kernel)(
          t.const_data_ptr<at::BFloat16>(), c.const_data_ptr<float>(), P, K, y.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      colnorm<float>(y, r.const_data_ptr<float>(), c, stream);
    }
  }
  return out;
}

TORCH_LIBRARY_IMPL(weakseg, CUDA, m) {
  m.impl("refine_propagate", &refine_propagate_cuda);
  m.impl("refine_propagate_qk", &refine_propagate_qk_cuda);
}

}  // namespace ops
}  // namespace weakseg
