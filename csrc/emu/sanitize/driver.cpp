// Standalone driver for `make emu-sanitize`: runs every CUDA launcher (and so
// every kernel) on the CPU emulator in OS-thread mode, on a few cases, and
// compares each result with the op's CPU implementation (csrc/ops/*.cpp).
// Built with -fsanitize=thread or -fsanitize=address together with
// csrc/emu/cuda_emu.cpp and csrc/emu/op_*.cpp; exits 1 on a mismatch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdio>
#include <tuple>

#include "csrc/emu/cuda_emu.h"

namespace weakseg {
namespace ops {
at::Tensor erode_cuda(const at::Tensor&, c10::IntArrayRef, int64_t);
at::Tensor erode_cpu(const at::Tensor&, c10::IntArrayRef, int64_t);
at::Tensor erode_labels_cuda(const at::Tensor&, c10::IntArrayRef, int64_t, int64_t);
at::Tensor erode_labels_cpu(const at::Tensor&, c10::IntArrayRef, int64_t, int64_t);
std::tuple<at::Tensor, at::Tensor> masked_area_pool_cuda(const at::Tensor&, const at::Tensor&, bool);
std::tuple<at::Tensor, at::Tensor> masked_area_pool_cpu(const at::Tensor&, const at::Tensor&, bool);
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_vote_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             int64_t, int64_t);
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_vote_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            int64_t, int64_t);
at::Tensor refine_propagate_cuda(const at::Tensor&, const at::Tensor&, double, int64_t);
at::Tensor refine_propagate_cpu(const at::Tensor&, const at::Tensor&, double, int64_t);
at::Tensor refine_propagate_qk_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, double);
at::Tensor refine_propagate_qk_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, double);
std::tuple<at::Tensor, at::Tensor> kl_kmeans_cuda(const at::Tensor&, const at::Tensor&, int64_t);
std::tuple<at::Tensor, at::Tensor> kl_kmeans_cpu(const at::Tensor&, const at::Tensor&, int64_t);
}  // namespace ops
}  // namespace weakseg

using namespace weakseg::ops;

static int failures = 0;
static void check(bool ok, const char* what) {
  std::printf("%-44s %s\n", what, ok ? "ok" : "MISMATCH");
  if (!ok) ++failures;
}
static bool close(const at::Tensor& a, const at::Tensor& b, double tol) {
  return a.sizes() == b.sizes() && (a.numel() == 0 || (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>() <= tol);
}

int main() {
  at::set_num_threads(1);  // no OpenMP threads in the CPU ops (libgomp is not instrumented)
  at::manual_seed(0);
  emu::configure("threads", 3);
  for (auto shape : {std::vector<int64_t>{2, 33, 20}, std::vector<int64_t>{1, 7}}) {
    auto mask = at::rand(shape) < 0.9;
    check(at::equal(erode_cuda(mask, {3, 5}, 2), erode_cpu(mask, {3, 5}, 2)), "erode");
    auto lab = at::randint(0, 3, shape).repeat_interleave(2, -1);
    check(at::equal(erode_labels_cuda(lab, {3, 3}, 2, 255), erode_labels_cpu(lab, {3, 3}, 2, 255)), "erode_labels");
  }
  {
    auto f = at::randn({2, 5, 4, 6});
    for (auto m : {at::rand({2, 3, 19, 23}), (at::rand({2, 3, 19, 23}) < 0.5)}) {
      auto [p, a] = masked_area_pool_cuda(f, m, true);
      auto [rp, ra] = masked_area_pool_cpu(f, m, true);
      check(close(p, rp, 1e-5) && close(a, ra, 1e-5), "masked_area_pool");
    }
  }
  for (auto [Q, N, k] : {std::tuple<int64_t, int64_t, int64_t>{3, 50, 5}, {2, 1500, 40}}) {
    auto q = at::randn({Q, 16}), b = at::randn({N, 16});
    auto l = at::randint(0, 4, {N});
    auto [lab, conf, votes] = knn_vote_cuda(q, b, l, k, 4);
    auto [rl, rc, rv] = knn_vote_cpu(q, b, l, k, 4);
    check(at::equal(lab, rl) && at::equal(votes, rv) && close(conf, rc, 1e-5), "knn_vote");
  }
  {
    auto attn = at::rand({1, 40, 40}).softmax(-1), maps = at::rand({1, 40, 3});
    check(close(refine_propagate_cuda(attn, maps, 0.015, 3), refine_propagate_cpu(attn, maps, 0.015, 3), 1e-4),
          "refine_propagate");
    auto a64 = attn.to(at::kDouble), m64 = maps.to(at::kDouble);
    check(close(refine_propagate_cuda(a64, m64, 0.015, 3), refine_propagate_cpu(a64, m64, 0.015, 3), 1e-10),
          "refine_propagate (float64)");
    auto q = at::randn({1, 2, 40, 8}), k = at::randn({1, 2, 40, 8});
    auto out = refine_propagate_qk_cuda(q, k, maps, 0.015, 3, 0.35);
    auto ref = refine_propagate_qk_cpu(q, k, maps, 0.015, 3, 0.35);
    check(close(out, ref, 2e-2 * ref.abs().max().item<double>()), "refine_propagate_qk (bf16 T')");
  }
  {
    auto x = at::rand({2, 40, 6}).softmax(-1);
    auto seeds = at::tensor({0, 10, 20, 30}, at::kLong);
    auto [l, c] = kl_kmeans_cuda(x, seeds, 4);
    auto [rl, rc] = kl_kmeans_cpu(x, seeds, 4);
    check(at::equal(l, rl) && close(c, rc, 1e-5), "kl_kmeans");
  }
  const auto s = emu::stats();
  std::printf("emulated: %ld launches, %ld blocks, %ld threads, %ld barriers, %ld warp shuffles\n", (long)s.launches,
              (long)s.blocks, (long)s.threads, (long)s.barriers, (long)s.shuffles);
  return failures ? 1 : 0;
}
