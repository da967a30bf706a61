// knn_vote: schema, input checks and the CPU implementation: the bank is
// streamed in tiles (one GEMM per tile, the bank split across threads), each
// query keeps its top-k in a sorted buffer that a vectorised threshold scan of
// the score tile feeds, then votes. Kernel bodies: kernels/knn_vote.h. CUDA
// launcher: cuda/knn_vote.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "csrc/ops/common.h"
#include "csrc/ops/knn_vote.h"
#include "kernels/knn_vote.h"

namespace weakseg {
namespace ops {

static at::Tensor l2_normalize_rows(const at::Tensor& x) {
  auto xf = x.to(at::kFloat);
  return (xf / xf.norm(2, 1, true).clamp_min(1e-12)).contiguous();
}

// The argument checks shared by every backend (dtypes, shapes, devices, label range).
static void check_knn_args(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& bank_labels,
                           int64_t k, int64_t num_classes) {
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
}

KnnArgs prepare_knn_args(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& bank_labels, int64_t k,
                         int64_t num_classes) {
  check_knn_args(queries, bank, bank_labels, k, num_classes);
  return {l2_normalize_rows(queries), l2_normalize_rows(bank), bank_labels.to(at::kLong).contiguous(),
          std::min<int64_t>(k, bank.size(0))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_knn_outputs(int64_t Q, int64_t num_classes,
                                                                 const at::TensorOptions& opts) {
  return {at::full({Q}, -1, opts.dtype(at::kLong)), at::zeros({Q}, opts.dtype(at::kFloat)),
          at::zeros({Q, num_classes}, opts.dtype(at::kLong))};
}

namespace {

#define WS_KNN_AI __attribute__((always_inline)) inline

// ---------------------------------------------------------------------------------------------
// CPU path. The bank is split into contiguous parts (one per thread when the bank is large,
// otherwise the queries are split); each part streams its rows in tiles: the tile is
// L2-normalised into a scratch buffer, one GEMM (at::mm_out: MKL/oneDNN sgemm) gives the
// similarities of a block of queries against it, and the epilogue scans each query's row of
// the score tile against that query's running k-th similarity (16 lanes at a time), so only
// the few candidates above it reach the sorted insertion. Each part keeps its own top-k per
// query; the parts cover ascending, disjoint index ranges, so merging them with knn_before
// keeps the tie rule (equal similarity: smaller bank index first) exact.

// Scan one query's row of the score tile into its sorted top-k list: candidate j has
// similarity row[j] / nrm[j] (the dot product of the unit query with the raw bank row, over the
// row's norm clamped at 1e-12, as the reference's F.normalize; parallel rows give exactly 1) and
// bank index base + j; candidates arrive in ascending index. The vector loops pre-filter with
// row[j] * inv[j] (inv = 1 / nrm) against the k-th similarity lowered by a few ulps, which the
// product never misses, and insert the exact quotients.
WS_KNN_AI float knn_sim(float dot, float nrm) { return kernels::knn_key(dot / nrm); }

WS_KNN_AI float relaxed(float thr) { return thr - (std::fabs(thr) * 0x1p-20f + 0x1p-140f); }

inline void scan_row_scalar(const float* row, const float* inv, const float* nrm, int64_t nn, int64_t base, float* v,
                            int64_t* id, int64_t* len, int64_t k) {
  (void)inv;
  for (int64_t j = 0; j < nn; ++j) {
    const float s = knn_sim(row[j], nrm[j]);
    // Later bank rows never win a tie, so "<=" rejects without a call.
    if (*len == k && s <= v[k - 1]) continue;
    kernels::topk_insert(v, id, len, k, s, base + j);
  }
}

// Row norms of src (rows x D), clamped at 1e-12, and their inverses.
inline void norms_scalar(const float* src, int64_t rows, int64_t D, float* nrm, float* inv) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* x = src + i * D;
    float ss = 0.f;
    for (int64_t j = 0; j < D; ++j) ss += x[j] * x[j];
    nrm[i] = std::max(std::sqrt(ss), 1e-12f);
    inv[i] = 1.0f / nrm[i];
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WS_KNN_X86 1
__attribute__((target("avx512f"))) void scan_row_avx512(const float* row, const float* inv, const float* nrm,
                                                          int64_t nn, int64_t base, float* v, int64_t* id,
                                                          int64_t* len, int64_t k) {
  int64_t j = 0;
  for (; j < nn && *len < k; ++j) kernels::topk_insert(v, id, len, k, knn_sim(row[j], nrm[j]), base + j);
  if (j == nn) return;
  __m512 thr = _mm512_set1_ps(relaxed(v[k - 1]));
  for (; j + 16 <= nn; j += 16) {
    // NaN compares false (it ranks last, like -inf, and a full list never takes -inf from a
    // later row); an equal similarity from a later row never displaces a kept one.
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row + j), _mm512_loadu_ps(inv + j));
    __mmask16 m = _mm512_cmp_ps_mask(x, thr, _CMP_GT_OQ);
    if (m) {
      do {
        const int b = __builtin_ctz(m);
        m &= static_cast<__mmask16>(m - 1);
        const float s = knn_sim(row[j + b], nrm[j + b]);
        if (s > v[k - 1]) kernels::topk_insert(v, id, len, k, s, base + j + b);
      } while (m);
      thr = _mm512_set1_ps(relaxed(v[k - 1]));
    }
  }
  scan_row_scalar(row + j, inv + j, nrm + j, nn - j, base + j, v, id, len, k);
}

__attribute__((target("avx2"))) void scan_row_avx2(const float* row, const float* inv, const float* nrm, int64_t nn,
                                                     int64_t base, float* v, int64_t* id, int64_t* len, int64_t k) {
  int64_t j = 0;
  for (; j < nn && *len < k; ++j) kernels::topk_insert(v, id, len, k, knn_sim(row[j], nrm[j]), base + j);
  if (j == nn) return;
  __m256 thr = _mm256_set1_ps(relaxed(v[k - 1]));
  for (; j + 8 <= nn; j += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(row + j), _mm256_loadu_ps(inv + j));
    unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(x, thr, _CMP_GT_OQ)));
    if (m) {
      do {
        const int b = __builtin_ctz(m);
        m &= m - 1;
        const float s = knn_sim(row[j + b], nrm[j + b]);
        if (s > v[k - 1]) kernels::topk_insert(v, id, len, k, s, base + j + b);
      } while (m);
      thr = _mm256_set1_ps(relaxed(v[k - 1]));
    }
  }
  scan_row_scalar(row + j, inv + j, nrm + j, nn - j, base + j, v, id, len, k);
}

__attribute__((target("avx512f"))) void norms_avx512(const float* src, int64_t rows, int64_t D, float* nrm,
                                                       float* inv) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* x = src + i * D;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= D; j += 32) {
      const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
      acc0 = _mm512_fmadd_ps(a, a, acc0);
      acc1 = _mm512_fmadd_ps(b, b, acc1);
    }
    for (; j + 16 <= D; j += 16) {
      const __m512 a = _mm512_loadu_ps(x + j);
      acc0 = _mm512_fmadd_ps(a, a, acc0);
    }
    float ss = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    for (; j < D; ++j) ss += x[j] * x[j];
    nrm[i] = std::max(std::sqrt(ss), 1e-12f);
    inv[i] = 1.0f / nrm[i];
  }
}
#endif

using ScanFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, float*, int64_t*, int64_t*,
                        int64_t);
using NormFn = void (*)(const float*, int64_t, int64_t, float*, float*);

ScanFn pick_scan() {
#ifdef WS_KNN_X86
  if (__builtin_cpu_supports("avx512f")) return scan_row_avx512;
  if (__builtin_cpu_supports("avx2")) return scan_row_avx2;
#endif
  return scan_row_scalar;
}

NormFn pick_norms() {
#ifdef WS_KNN_X86
  if (__builtin_cpu_supports("avx512f")) return norms_avx512;
#endif
  return norms_scalar;
}

struct KnnPlan {
  int64_t nt;      // bank rows per tile
  int64_t qb;      // queries per GEMM
  int64_t parts;   // bank parts (each its own top-k lists)
  int64_t qparts;  // query chunks
};

// Tiles: the bank tile (nt x D) and the score tile (qb x nt) stay in L2; the bank is split
// across threads when it has at least two tiles per thread, else the queries are.
KnnPlan plan_knn(int64_t Q, int64_t N, int64_t D, int64_t threads) {
  KnnPlan p;
  // A bank tile of about 1 MiB: 256 rows at D = 1024, 1024 rows at D = 256.
  p.nt = std::max<int64_t>(64, std::min<int64_t>(1024, ((int64_t(1) << 18) / std::max<int64_t>(D, 1)) / 16 * 16));
  p.qb = 1024;
  const int64_t min_part = 2 * p.nt;
  p.parts = std::max<int64_t>(1, std::min<int64_t>(threads, N / min_part));
  p.qparts = 1;
  if (p.parts == 1) p.qparts = std::max<int64_t>(1, std::min<int64_t>(threads, Q / 64));
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_vote_cpu(const at::Tensor& queries, const at::Tensor& bank,
                                                            const at::Tensor& bank_labels, int64_t k,
                                                            int64_t num_classes) {
  check_knn_args(queries, bank, bank_labels, k, num_classes);
  const int64_t Q = queries.size(0), N = bank.size(0), D = queries.size(1), kk = std::min<int64_t>(k, N);
  auto [labels, conf, votes] = empty_knn_outputs(Q, num_classes, queries.options());
  if (Q == 0 || kk == 0) return {labels, conf, votes};
  const at::Tensor qn = l2_normalize_rows(queries);
  const at::Tensor bf = bank.to(at::kFloat).contiguous();  // no copy for a contiguous float32 bank
  const at::Tensor bl_t = bank_labels.to(at::kLong).contiguous();
  const float* bdat = bf.data_ptr<float>();
  const auto fopts = at::TensorOptions().dtype(at::kFloat);

  const KnnPlan plan = plan_knn(Q, N, D, at::get_num_threads());
  const int64_t P = plan.parts, QP = plan.qparts;
  // Per part: Q lists of kk (similarity, index) and their lengths.
  std::vector<float> top_v(static_cast<size_t>(P * Q * kk));
  std::vector<int64_t> top_i(static_cast<size_t>(P * Q * kk));
  std::vector<int64_t> len(static_cast<size_t>(P * Q), 0);
  static const ScanFn scan = pick_scan();
  static const NormFn norms = pick_norms();
  const at::Tensor bank_raw = at::from_blob(const_cast<float*>(bdat), {N, D}, fopts);

  // Unit u: bank part u / QP, query chunk u % QP. Per bank tile: the GEMM of each block of the
  // chunk's queries against the raw tile (MKL streams it from memory), the tile's inverse row
  // norms (the tile is in cache by then), and the scan.
  auto run_unit = [&](int64_t u, float* score, float* inv, float* nrm) {
    const int64_t nt = std::min(plan.nt, N), qb = std::min(plan.qb, Q);
    const int64_t p = u / QP, qp = u % QP;
    const int64_t ntiles = (N + nt - 1) / nt;
    const int64_t n_begin = std::min(N, (ntiles * p / P) * nt), n_end = std::min(N, (ntiles * (p + 1) / P) * nt);
    const int64_t qa = Q * qp / QP, qz = Q * (qp + 1) / QP;
    float* V = top_v.data() + p * Q * kk;
    int64_t* I = top_i.data() + p * Q * kk;
    int64_t* L = len.data() + p * Q;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += nt) {
      const int64_t nn = std::min(nt, n_end - n0);
      const at::Tensor bt = bank_raw.narrow(0, n0, nn).t();
      for (int64_t q0 = qa; q0 < qz; q0 += qb) {
        const int64_t rows = std::min(qb, qz - q0);
        at::Tensor st = at::from_blob(score, {rows, nn}, fopts);
        at::mm_out(st, qn.narrow(0, q0, rows), bt);  // (rows, nn): one tile, never Q x N
        if (q0 == qa) norms(bdat + n0 * D, nn, D, nrm, inv);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t q = q0 + i;
          scan(score + i * nn, inv, nrm, nn, n0, V + q * kk, I + q * kk, L + q, kk);
        }
      }
    }
  };
  const int64_t units = P * QP;
  const size_t score_n = static_cast<size_t>(std::min(plan.qb, Q) * std::min(plan.nt, N));
  const size_t inv_n = static_cast<size_t>(std::min(plan.nt, N));
  if (units == 1) {
    // One unit: the GEMMs use every thread (MKL's own parallelism).
    std::unique_ptr<float[]> score(new float[score_n]), inv(new float[inv_n]), nrm(new float[inv_n]);
    run_unit(0, score.get(), inv.get(), nrm.get());
  } else {
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      std::unique_ptr<float[]> score(new float[score_n]), inv(new float[inv_n]), nrm(new float[inv_n]);
      for (int64_t u = u0; u < u1; ++u) run_unit(u, score.get(), inv.get(), nrm.get());
    });
  }

  // Merge the parts' lists (ascending, disjoint index ranges) into part 0's, then vote.
  const int64_t* bl = bl_t.data_ptr<int64_t>();
  int64_t* out_l = labels.data_ptr<int64_t>();
  float* out_c = conf.data_ptr<float>();
  int64_t* out_v = votes.data_ptr<int64_t>();
  at::parallel_for(0, Q, 64, [&](int64_t q0, int64_t q1) {
    std::vector<int64_t> vl(static_cast<size_t>(kk));
    std::vector<float> sums(static_cast<size_t>(num_classes), 0.f);
    std::vector<float> mv(static_cast<size_t>(kk));
    std::vector<int64_t> mi(static_cast<size_t>(kk));
    for (int64_t q = q0; q < q1; ++q) {
      float* v0 = top_v.data() + q * kk;
      int64_t* i0 = top_i.data() + q * kk;
      int64_t n0 = len[q];
      for (int64_t p = 1; p < P; ++p) {
        const float* v1 = top_v.data() + (p * Q + q) * kk;
        const int64_t* i1 = top_i.data() + (p * Q + q) * kk;
        const int64_t n1 = len[p * Q + q];
        int64_t a = 0, b = 0, m = 0;
        while (m < kk && (a < n0 || b < n1)) {
          if (b >= n1 || (a < n0 && kernels::knn_before(v0[a], i0[a], v1[b], i1[b]))) {
            mv[m] = v0[a], mi[m++] = i0[a++];
          } else {
            mv[m] = v1[b], mi[m++] = i1[b++];
          }
        }
        std::copy(mv.begin(), mv.begin() + m, v0);
        std::copy(mi.begin(), mi.begin() + m, i0);
        n0 = m;
      }
      // n0 == kk: the parts hold N >= kk rows in all.
      for (int64_t j = 0; j < kk; ++j) vl[j] = bl[i0[j]];
      kernels::vote_one(v0, vl.data(), kk, out_v + q * num_classes, sums.data(), out_l + q, out_c + q);
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
