// kl_kmeans: schema, input checks, the Lloyd loop shared by both backends
// (float64 GEMM scores via at::bmm, anchor updates and relabelling with tensor
// ops, no host sync inside) and the CPU step. Everything runs in float64 (the
// expanded distance cancels, see kernels/kl_kmeans.h); the centroids are
// returned in float32, or float64 for float64 input. Kernel bodies: kernels/kl_kmeans.h.
// CUDA step: cuda/kl_kmeans.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "csrc/ops/common.h"
#include "csrc/ops/kl_kmeans.h"
#include "kernels/kl_kmeans.h"

namespace weakseg {
namespace ops {

KlArgs prepare_kl_args(const at::Tensor& x, const at::Tensor& seeds, int64_t iterations) {
  const char* op = "kl_kmeans";
  WS_CHECK(x.dim() == 3, op, "expected x of shape (B, N, D), got ", shape_str(x));
  WS_CHECK(at::isFloatingType(x.scalar_type()), op, "expected floating-point x, got ", x.scalar_type());
  WS_CHECK(seeds.dim() == 1, op, "expected seeds of shape (S,), got ", shape_str(seeds));
  const auto st = seeds.scalar_type();
  WS_CHECK(st == at::kLong || st == at::kInt, op, "expected seeds of dtype int64 or int32, got ", st);
  check_same_device(x, "x", seeds, "seeds", op);
  WS_CHECK(iterations >= 1, op, "iterations must be >= 1, got ", iterations);
  const int64_t N = x.size(1);
  if (N > 0) {
    WS_CHECK(seeds.numel() > 0, op, "seeds must not be empty when x has points (N=", N, ")");
    auto [lo, hi] = at::aminmax(seeds);  // one small sync, before the loop
    const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
    WS_CHECK(l >= 0 && h < N, op, "seeds must lie in [0, N=", N, "), found values in [", l, ", ", h, "]");
  }
  const auto out = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {x.to(at::kDouble).contiguous(), seeds.to(at::kLong).contiguous(), iterations, out};
}

// (D,) int64 odd multipliers (splitmix64 of the column index) for an exact row hash of float64 rows.
static at::Tensor duplicate_hash_weights(int64_t D, const at::Device& device) {
  auto w = at::empty({D}, at::TensorOptions().dtype(at::kLong));
  auto* wp = w.data_ptr<int64_t>();
  uint64_t z = 0x9E3779B97F4A7C15ull;
  for (int64_t d = 0; d < D; ++d) {
    z += 0x9E3779B97F4A7C15ull;
    uint64_t v = z;
    v = (v ^ (v >> 30)) * 0xBF58476D1CE4E5B9ull;
    v = (v ^ (v >> 27)) * 0x94D049BB133111EBull;
    wp[d] = static_cast<int64_t>((v ^ (v >> 31)) | 1ull);
  }
  return w.to(device);
}

// (B, S) bool: anchor s is alive and bitwise equal to an alive anchor s' < s. ac: (B, S, D) float64
// contiguous. An integer hash of the bit patterns (wrapping products and sums: exact, so equal rows
// hash equally whatever the summation order) picks the first candidate, and a direct comparison
// confirms it (a hash collision just leaves the anchor alone). No host sync.
static at::Tensor later_duplicates(const at::Tensor& ac, const at::Tensor& counts, const at::Tensor& w) {
  const int64_t S = ac.size(1);
  auto alive = counts > 0;
  if (S < 2) return at::zeros_like(alive);
  auto h = (ac.contiguous().view(at::kLong) * w).sum(2);                                   // (B, S)
  auto same = (h.unsqueeze(2) == h.unsqueeze(1)).logical_and_(alive.unsqueeze(1));         // (B, S, S')
  auto first = same.to(at::kByte).argmax(2);  // the first alive s' with the same hash (s itself if none)
  auto idx = at::arange(S, first.options()).unsqueeze(0);
  auto equal = (ac.gather(1, first.unsqueeze(2).expand_as(ac)) == ac).all(2);
  return alive.logical_and(first < idx).logical_and_(equal);
}

std::tuple<at::Tensor, at::Tensor> kl_kmeans_loop(const KlArgs& a, KlStepFn step) {
  const auto& x = a.x;
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), S = a.seeds.size(0);
  auto labels = at::zeros({B, N}, x.options().dtype(at::kLong));
  if (B == 0 || N == 0) return {labels, at::zeros({B, S, D}, x.options().dtype(a.out_dtype))};

  const double eps = kernels::KL_EPS;
  // (B, N, 2D): [x~, ln x~], x~ = max(x, 0) + eps (eps added to every entry), written in place: the
  // (B, N, D)-sized temporaries are the large ones, and every fresh one costs its page faults.
  auto points = at::empty({B, N, 2 * D}, x.options());
  auto xc = points.narrow(2, 0, D);
  at::clamp_min_out(xc, x, 0).add_(eps);
  auto lx = points.narrow(2, D, D);
  at::log_out(lx, xc);
  auto anchors = x.index_select(1, a.seeds);  // (B, S, D)
  auto counts = at::ones({B, S}, x.options().dtype(at::kInt));
  auto assign = at::empty({B, N}, labels.options());
  const auto row_hash_w = duplicate_hash_weights(D, x.device());
  for (int64_t it = 0; it < a.iterations; ++it) {
    auto ac = anchors.clamp_min(0) + eps;
    // An anchor equal to an earlier alive one has the same distances in the direct form, so it never
    // wins there (ties go to the smaller index) and dies; the GEMM need not give equal columns equal
    // floats (a BLAS treats edge columns differently), so such anchors are retired here, up front.
    counts = at::where(later_duplicates(ac, counts, row_hash_w), at::zeros({}, counts.options()), counts);
    auto la = ac.log();
    auto cconst = (ac * la).sum(2).contiguous();                          // (B, S): sum c~ ln c~
    auto g = at::bmm(points, at::cat({la, ac}, 2).transpose(1, 2)).contiguous();  // (B, N, S)
    auto sums = at::zeros({B, S, D}, x.options());
    auto new_counts = at::zeros({B, S}, counts.options());
    step(g, cconst, counts, x, assign, sums, new_counts);
    auto alive = (new_counts > 0).unsqueeze(2);
    // Alive anchors become their members' mean; dead ones keep their (masked) row.
    anchors = at::where(alive, sums / new_counts.to(x.scalar_type()).clamp_min(1).unsqueeze(2), anchors);
    counts = new_counts;
  }
  // Relabel contiguously in anchor order; alive anchors' means move to rows [0, n_b).
  auto alive = counts > 0;
  auto remap = alive.cumsum(1) - 1;  // int64
  labels = remap.gather(1, assign);
  auto dest = at::where(alive, remap, at::full({}, S, remap.options()));  // dead rows -> scratch row S
  auto buf = at::zeros({B, S + 1, D}, x.options());
  buf.scatter_(1, dest.unsqueeze(2).expand({B, S, D}), anchors);
  return {labels, buf.narrow(1, 0, S).to(a.out_dtype).contiguous()};
}

template <typename T>
static void kl_step_cpu_impl(const at::Tensor& g, const at::Tensor& cconst, const at::Tensor& prev_counts,
                             const at::Tensor& x, at::Tensor& assign, at::Tensor& sums, at::Tensor& counts) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), S = g.size(2);
  const T* gp = g.data_ptr<T>();
  const T* cp = cconst.data_ptr<T>();
  const int32_t* pc = prev_counts.data_ptr<int32_t>();
  const T* xp = x.data_ptr<T>();
  int64_t* ap = assign.data_ptr<int64_t>();
  T* sp = sums.data_ptr<T>();
  int32_t* np = counts.data_ptr<int32_t>();
  // Pass 1: every point's best alive anchor.
  // Grains of ~64k element operations: small problems stay on one thread.
  constexpr int64_t kGrainWork = int64_t(1) << 16;
  const int64_t grain = std::max<int64_t>(1, kGrainWork / std::max<int64_t>(S, 1));
  at::parallel_for(0, B * N, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1;) {
      const int64_t b = p / N, end = std::min(p1, (b + 1) * N);
      kernels::kl_assign_range(gp + b * N * S, cp + b * S, pc + b * S, S, p - b * N, end - b * N, ap + b * N);
      p = end;
    }
  });
  // Pass 2: member sums, each (image, column block) owned by one task and summed
  // in point order, so the result does not depend on the thread count.
  // At least one block, even for D == 0: block 0 also counts the members.
  constexpr int64_t DB = 32;
  const int64_t nblk = std::max<int64_t>(1, (D + DB - 1) / DB);
  const int64_t job_grain = std::max<int64_t>(1, kGrainWork / std::max<int64_t>(N * DB, 1));
  at::parallel_for(0, B * nblk, job_grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / nblk, blk = j % nblk;
      const int64_t d0 = blk * DB, d1 = std::min(D, d0 + DB);
      kernels::kl_accumulate_columns(xp + b * N * D, ap + b * N, N, D, d0, d1, sp + b * S * D,
                                     blk == 0 ? np + b * S : nullptr);
    }
  });
}

static void kl_step_cpu(const at::Tensor& g, const at::Tensor& cconst, const at::Tensor& prev_counts,
                        const at::Tensor& x, at::Tensor& assign, at::Tensor& sums, at::Tensor& counts) {
  kl_step_cpu_impl<double>(g, cconst, prev_counts, x, assign, sums, counts);  // the loop runs in float64
}

std::tuple<at::Tensor, at::Tensor> kl_kmeans_cpu(const at::Tensor& x, const at::Tensor& seeds, int64_t iterations) {
  return kl_kmeans_loop(prepare_kl_args(x, seeds, iterations), &kl_step_cpu);
}

TORCH_LIBRARY_FRAGMENT(weakseg, m) {
  m.def("kl_kmeans(Tensor x, Tensor seeds, int iterations) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(weakseg, CPU, m) { m.impl("kl_kmeans", &kl_kmeans_cpu); }

}  // namespace ops
}  // namespace weakseg
