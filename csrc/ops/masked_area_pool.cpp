// masked_area_pool: schema, input checks, the device-independent tail, and the
// CPU patch weights. Kernel bodies: kernels/masked_area_pool.h. CUDA launcher:
// cuda/masked_area_pool.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "csrc/ops/common.h"
#include "csrc/ops/masked_area_pool.h"
#include "kernels/masked_area_pool.h"

namespace weakseg {
namespace ops {

at::Tensor check_masked_area_pool_args(const at::Tensor& features, const at::Tensor& masks) {
  const char* op = "masked_area_pool";
  WS_CHECK(features.dim() == 4, op, "expected features of shape (B, C, h, w), got ", shape_str(features));
  WS_CHECK(masks.dim() == 4, op, "expected masks of shape (B, M, H, W), got ", shape_str(masks));
  WS_CHECK(at::isFloatingType(features.scalar_type()), op, "expected floating-point features, got ",
           features.scalar_type());
  const auto mt = masks.scalar_type();
  WS_CHECK(mt == at::kBool || mt == at::kByte || at::isFloatingType(mt), op,
           "expected masks of dtype bool, uint8 or floating point, got ", mt);
  check_same_device(features, "features", masks, "masks", op);
  WS_CHECK(features.size(0) == masks.size(0), op, "features and masks must have the same batch size, got ",
           features.size(0), " and ", masks.size(0));
  WS_CHECK(features.size(2) >= 1 && features.size(3) >= 1, op, "features need a non-empty patch grid, got ",
           shape_str(features));
  WS_CHECK(masks.size(2) >= 1 && masks.size(3) >= 1, op, "masks need a non-empty H x W, got ", shape_str(masks));
  if (mt == at::kBool) return masks.contiguous().view(at::kByte);
  if (mt == at::kByte || mt == at::kFloat || mt == at::kDouble) return masks.contiguous();
  return masks.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> pool_from_weights(const at::Tensor& features, const at::Tensor& weights,
                                                     bool normalize) {
  const int64_t B = features.size(0), C = features.size(1), hw = features.size(2) * features.size(3);
  const auto ct = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto W = weights.to(ct);                                          // (B, M, hw)
  auto F = features.reshape({B, C, hw}).to(ct);                     // (B, C, hw)
  auto sums = at::bmm(W, F.transpose(1, 2));                        // (B, M, C)
  auto area = W.sum(-1);                                            // (B, M)
  auto pooled = sums / area.clamp_min(1e-30).unsqueeze(-1);
  pooled = at::where((area > 0).unsqueeze(-1), pooled, at::zeros({}, pooled.options()));
  if (normalize) pooled = pooled / pooled.norm(2, -1, true).clamp_min(1e-12);
  return {pooled.to(features.scalar_type()), area};
}

template <typename MaskT>
void patch_weights_cpu(const MaskT* masks, float* out, int64_t planes, int64_t H, int64_t W, int64_t h,
                       int64_t w) {
  at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> colsum;
    for (int64_t p = p0; p < p1; ++p)
      kernels::patch_weights_plane<MaskT>(masks + p * H * W, H, W, h, w, out + p * h * w, colsum);
  });
}

std::tuple<at::Tensor, at::Tensor> masked_area_pool_cpu(const at::Tensor& features, const at::Tensor& masks,
                                                        bool normalize) {
  auto m = check_masked_area_pool_args(features, masks);
  const int64_t B = m.size(0), M = m.size(1), H = m.size(2), W = m.size(3);
  const int64_t h = features.size(2), w = features.size(3);
  auto weights = at::empty({B, M, h * w}, m.options().dtype(at::kFloat));
  if (B * M > 0) {
    switch (m.scalar_type()) {
      case at::kByte: patch_weights_cpu<uint8_t>(m.data_ptr<uint8_t>(), weights.data_ptr<float>(), B * M, H, W, h, w); break;
      case at::kDouble: patch_weights_cpu<double>(m.data_ptr<double>(), weights.data_ptr<float>(), B * M, H, W, h, w); break;
      default: patch_weights_cpu<float>(m.data_ptr<float>(), weights.data_ptr<float>(), B * M, H, W, h, w);
    }
  }
  return pool_from_weights(features, weights, normalize);
}

TORCH_LIBRARY_FRAGMENT(weakseg, m) {
  m.def("masked_area_pool(Tensor features, Tensor masks, bool normalize=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(weakseg, CPU, m) { m.impl("masked_area_pool", &masked_area_pool_cpu); }

}  // namespace ops
}  // namespace weakseg
