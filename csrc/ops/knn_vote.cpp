// knn_vote: schema, input checks and the CPU implementation: the bank is
// streamed in tiles (one GEMM per tile), each query keeps its top-k in a
// sorted buffer, then votes. Kernel bodies: kernels/knn_vote.h. CUDA
// launcher: cuda/knn_vote.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "csrc/ops/common.h"
#include "csrc/ops/knn_vote.h"
#include "kernels/knn_vote.h"

namespace weakseg {
namespace ops {

static at::Tensor l2_normalize_rows(const at::Tensor& x) {
  auto xf = x.to(at::kFloat);
  return (xf / xf.norm(2, 1, true).clamp_min(1e-12)).contiguous();
}

KnnArgs prepare_knn_args(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& bank_labels, int64_t k,
                         int64_t num_classes) {
  const char* op = "knn_vote";
  WS_CHECK(queries.dim() == 2, op, "expected queries of shape (Q, D), got ", shape_str(queries));
  WS_CHECK(bank.dim() == 2, op, "expected bank of shape (N, D), got ", shape_str(bank));
  WS_CHECK(bank_labels.dim() == 1, op, "expected bank_labels of shape (N,), got ", shape_str(bank_labels));
  WS_CHECK(at::isFloatingType(queries.scalar_type()), op, "expected floating-point queries, got ",
           queries.scalar_type());
  WS_CHECK(at::isFloatingType(bank.scalar_type()), op, "expected a floating-point bank, got ", bank.scalar_type());
  const auto lt = bank_labels.scalar_type();
  WS_CHECK(lt == at::kLong || lt == at::kInt, op, "expected bank_labels of dtype int64 or int32, got ", lt);
  check_same_device(queries, "queries", bank, "bank", op);
  check_same_device(bank, "bank", bank_labels, "bank_labels", op);
  WS_CHECK(queries.size(1) == bank.size(1), op, "queries and bank must have the same feature size D, got ",
           queries.size(1), " and ", bank.size(1));
  WS_CHECK(bank_labels.size(0) == bank.size(0), op, "bank_labels must have one label per bank row: ",
           bank_labels.size(0), " labels for ", bank.size(0), " rows");
  WS_CHECK(k >= 1, op, "k must be >= 1, got ", k);
  WS_CHECK(num_classes >= 1 && num_classes <= kKnnMaxClasses, op, "num_classes must be in [1, ", kKnnMaxClasses,
           "], got ", num_classes);
  if (bank_labels.numel() > 0) {
    auto [lo, hi] = at::aminmax(bank_labels);
    const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
    WS_CHECK(l >= 0 && h < num_classes, op, "bank_labels must lie in [0, num_classes=", num_classes,
             "), found values in [", l, ", ", h, "]");
  }
  return {l2_normalize_rows(queries), l2_normalize_rows(bank), bank_labels.to(at::kLong).contiguous(),
          std::min<int64_t>(k, bank.size(0))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_knn_outputs(int64_t Q, int64_t num_classes,
                                                                 const at::TensorOptions& opts) {
  return {at::full({Q}, -1, opts.dtype(at::kLong)), at::zeros({Q}, opts.dtype(at::kFloat)),
          at::zeros({Q, num_classes}, opts.dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_vote_cpu(const at::Tensor& queries, const at::Tensor& bank,
                                                            const at::Tensor& bank_labels, int64_t k,
                                                            int64_t num_classes) {
  auto a = prepare_knn_args(queries, bank, bank_labels, k, num_classes);
  const int64_t Q = a.queries.size(0), N = a.bank.size(0), kk = a.k;
  auto [labels, conf, votes] = empty_knn_outputs(Q, num_classes, a.queries.options());
  if (Q == 0 || kk == 0) return {labels, conf, votes};

  std::vector<float> top_v(static_cast<size_t>(Q * kk));
  std::vector<int64_t> top_i(static_cast<size_t>(Q * kk));
  std::vector<int64_t> len(static_cast<size_t>(Q), 0);
  constexpr int64_t QT = 1024, NT = 4096;
  for (int64_t q0 = 0; q0 < Q; q0 += QT) {
    const int64_t qn = std::min(QT, Q - q0);
    auto qs = a.queries.narrow(0, q0, qn);
    for (int64_t n0 = 0; n0 < N; n0 += NT) {
      const int64_t nn = std::min(NT, N - n0);
      auto sims = at::mm(qs, a.bank.narrow(0, n0, nn).t()).contiguous();  // (qn, nn): one tile, never Q x N
      const float* s = sims.data_ptr<float>();
      at::parallel_for(0, qn, 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t q = q0 + i;
          float* v = top_v.data() + q * kk;
          int64_t* id = top_i.data() + q * kk;
          int64_t* l = &len[q];
          const float* row = s + i * nn;
          for (int64_t j = 0; j < nn; ++j) {
            const float sj = kernels::knn_key(row[j]);
            // Later bank rows never win a tie, so "<=" rejects without a call.
            if (*l == kk && sj <= v[kk - 1]) continue;
            kernels::topk_insert(v, id, l, kk, sj, n0 + j);
          }
        }
      });
    }
  }
  const int64_t* bl = a.bank_labels.data_ptr<int64_t>();
  int64_t* out_l = labels.data_ptr<int64_t>();
  float* out_c = conf.data_ptr<float>();
  int64_t* out_v = votes.data_ptr<int64_t>();
  at::parallel_for(0, Q, 64, [&](int64_t q0, int64_t q1) {
    std::vector<int64_t> vl(static_cast<size_t>(kk));
    std::vector<float> sums(static_cast<size_t>(num_classes), 0.f);
    for (int64_t q = q0; q < q1; ++q) {
      for (int64_t j = 0; j < kk; ++j) vl[j] = bl[top_i[q * kk + j]];
      kernels::vote_one(top_v.data() + q * kk, vl.data(), kk, out_v + q * num_classes, sums.data(), out_l + q,
                        out_c + q);
      for (int64_t j = 0; j < kk; ++j) sums[vl[j]] = 0.f;  // reset only what this query touched
    }
  });
  return {labels, conf, votes};
}

TORCH_LIBRARY_FRAGMENT(weakseg, m) {
  m.def("knn_vote(Tensor queries, Tensor bank, Tensor bank_labels, int k, int num_classes) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(weakseg, CPU, m) { m.impl("knn_vote", &knn_vote_cpu); }

}  // namespace ops
}  // namespace weakseg
