// refine_propagate and refine_propagate_qk: schemas, input checks and the CPU
// implementations. Kernel bodies: kernels/refine_propagate.h. CUDA launchers:
// cuda/refine_propagate.cu.
//
// Per batch element the CPU path holds one P x P buffer T' (the clamped,
// column-max-normalised attention) and its row sums r; each of the `steps`
// iterations is one GEMM T' C followed by one fused pass that applies 1/r,
// subtracts the column minimum and divides by the column sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "csrc/ops/common.h"
#include "csrc/ops/refine_propagate.h"
#include "kernels/refine_propagate.h"

namespace weakseg {
namespace ops {

static void check_ent_steps(double ent, int64_t steps, const char* op) {
  WS_CHECK(std::isfinite(ent) && ent >= 0, op, "ent must be a finite number >= 0, got ", ent);
  WS_CHECK(steps >= 0, op, "steps must be >= 0, got ", steps);
}

static void check_maps(const at::Tensor& maps, int64_t B, int64_t P, const at::Tensor& other, const char* other_name,
                       const char* op) {
  WS_CHECK(maps.dim() == 3, op, "expected maps of shape (B, P, K), got ", shape_str(maps));
  WS_CHECK(at::isFloatingType(maps.scalar_type()), op, "expected floating-point maps, got ", maps.scalar_type());
  check_same_device(other, other_name, maps, "maps", op);
  WS_CHECK(maps.size(0) == B && maps.size(1) == P, op, "maps must be (B, P, K) = (", B, ", ", P,
           ", K) to match ", other_name, ", got ", shape_str(maps));
}

void check_refine_args(const at::Tensor& attn, const at::Tensor& maps, double ent, int64_t steps) {
  const char* op = "refine_propagate";
  WS_CHECK(attn.dim() == 3 && attn.size(1) == attn.size(2), op, "expected attn of shape (B, P, P), got ",
           shape_str(attn));
  WS_CHECK(at::isFloatingType(attn.scalar_type()), op, "expected floating-point attn, got ", attn.scalar_type());
  check_maps(maps, attn.size(0), attn.size(1), attn, "attn", op);
  check_ent_steps(ent, steps, op);
}

void check_refine_qk_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& maps, double ent,
                          int64_t steps, double scale) {
  const char* op = "refine_propagate_qk";
  WS_CHECK(q.dim() == 4, op, "expected q of shape (B, heads, P, d), got ", shape_str(q));
  WS_CHECK(k.sizes() == q.sizes(), op, "expected k of the same shape as q ", shape_str(q), ", got ", shape_str(k));
  WS_CHECK(at::isFloatingType(q.scalar_type()) && at::isFloatingType(k.scalar_type()), op,
           "expected floating-point q and k, got ", q.scalar_type(), " and ", k.scalar_type());
  check_same_device(q, "q", k, "k", op);
  WS_CHECK(q.size(1) >= 1, op, "q and k need at least one head, got ", shape_str(q));
  WS_CHECK(q.size(3) >= 1, op, "q and k need a head dimension d >= 1, got ", shape_str(q));
  check_maps(maps, q.size(0), q.size(2), q, "q", op);
  check_ent_steps(ent, steps, op);
  WS_CHECK(std::isfinite(scale), op, "scale must be finite, got ", scale);
}

at::ScalarType refine_compute_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

double refine_threshold(double ent) {
  if (!(ent > 0)) return 0.0;
  const double lam = ent / 2.302585092994045684;
  // f(t) = t + lam (1 + ln t) increases from -inf (t -> 0) to 1 + lam (t = 1).
  double lo = 0.0, hi = 1.0;
  for (int i = 0; i < 200; ++i) {
    const double mid = 0.5 * (lo + hi);
    if (mid <= 0 || mid + lam * (1.0 + std::log(mid)) <= 0) lo = mid; else hi = mid;
  }
  return lo * (1.0 - 1e-4);
}

// --------------------------------------------------------------------------------------------
// CPU pieces

// Column maxima of a (P x P, row-major) clamped below at 0, so columns without
// a positive entry give 0: each thread takes a band of rows (a vectorisable
// running max over whole rows), then the bands are combined.
template <typename in_t, typename acc_t>
static void colmax_cpu(const in_t* a, int64_t P, acc_t* cmax) {
  // Small matrices stay on the calling thread (a parallel region costs more than they do).
  const int64_t nt = P * P < (int64_t(1) << 20) ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P / 64));
  std::vector<acc_t> part(static_cast<size_t>(nt * P), acc_t(0));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      acc_t* m = part.data() + t * P;
      for (int64_t i = t * P / nt; i < (t + 1) * P / nt; ++i) {
        const in_t* ai = a + i * P;
        for (int64_t j = 0; j < P; ++j) {
          const acc_t v = static_cast<acc_t>(ai[j]);
          m[j] = v > m[j] ? v : m[j];
        }
      }
    }
  });
  for (int64_t j = 0; j < P; ++j) cmax[j] = part[j];
  for (int64_t t = 1; t < nt; ++t)
    for (int64_t j = 0; j < P; ++j) cmax[j] = part[t * P + j] > cmax[j] ? part[t * P + j] : cmax[j];
}

// Sparse rows. After the cut, T' of real attention is mostly zeros, so a row
// with at most P / 4 non-zeros is packed in place: its values first, then
// their column indices as int32 in the slots that follow. The steps then run
// a row-wise sparse product instead of a dense GEMM. No extra P x P storage.
template <typename acc_t>
static void pack_row(acc_t* ti, int64_t P, int64_t n, std::vector<int32_t>& idx) {
  idx.resize(static_cast<size_t>(n));
  int64_t w = 0;
  for (int64_t j = 0; j < P; ++j) {
    if (ti[j] != acc_t(0)) {
      ti[w] = ti[j];  // w <= j: in-place compaction
      idx[w++] = static_cast<int32_t>(j);
    }
  }
  std::memcpy(ti + n, idx.data(), static_cast<size_t>(n) * sizeof(int32_t));
}

template <typename acc_t>
static void unpack_row(acc_t* ti, int64_t P, int64_t n, std::vector<acc_t>& val, std::vector<int32_t>& idx) {
  val.assign(ti, ti + n);
  idx.resize(static_cast<size_t>(n));
  std::memcpy(idx.data(), ti + n, static_cast<size_t>(n) * sizeof(int32_t));
  std::fill(ti, ti + P, acc_t(0));
  for (int64_t m = 0; m < n; ++m) ti[idx[m]] = val[m];
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WS_REFINE_X86 1
// Natural log of 16 positive floats (normal or subnormal; other lanes give garbage that the
// caller masks): x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln(1 + f) for f = m - 1 by the usual
// degree-9 minimax polynomial of single-precision logarithms; about 1 ulp.
__attribute__((target("avx512f"))) static inline __m512 log_ps_avx512(__m512 x) {
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);  // [1, 2)
  __m512 e = _mm512_getexp_ps(x);                                          // floor(log2 x), subnormals too
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 y = _mm512_set1_ps(7.0376836292E-2f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.1514610310E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.1676998740E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.2420140846E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.4249322787E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.6668057665E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.0000714765E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-2.4999993993E-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(3.3333331174E-1f));
  y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);                  // f^3 P(f)
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);  // e ln2 (low part)
  y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);            // - f^2 / 2
  const __m512 r = _mm512_add_ps(f, y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), r);  // e ln2 (high part)
}

// One row of T' (float): t = a * inv; t + lam (1 + ln t) where t > t_lo, clamped at 0, else 0.
// Returns the row sum and stores the non-zero count in *nnz.
__attribute__((target("avx512f"))) static float ers_row_avx512(const float* ai, const float* inv, int64_t P,
                                                                float lam, float t_lo, float* ti, int64_t* nnz) {
  __m512 vsum = _mm512_setzero_ps();
  int64_t n = 0;
  const __m512 vlo = _mm512_set1_ps(t_lo), vlam = _mm512_set1_ps(lam), one = _mm512_set1_ps(1.0f),
               zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < P; j += 16) {
    const __mmask16 tail = P - j >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (P - j)) - 1u);
    const __m512 tv = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, ai + j), _mm512_maskz_loadu_ps(tail, inv + j));
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(tail, tv, vlo, _CMP_GT_OQ);  // NaN: false
    __m512 v = zero;
    if (keep) {
      v = lam == 0.f ? tv : _mm512_fmadd_ps(vlam, _mm512_add_ps(one, log_ps_avx512(tv)), tv);
      v = _mm512_maskz_max_ps(keep, v, zero);
      vsum = _mm512_add_ps(vsum, v);
      n += __builtin_popcount(static_cast<unsigned>(_mm512_cmp_ps_mask(v, zero, _CMP_NEQ_UQ)));
    }
    _mm512_mask_storeu_ps(ti + j, tail, v);
  }
  *nnz = n;
  return _mm512_reduce_add_ps(vsum);
}
#endif

// Rows [i0, i1) of T' from attention `a` (P x P, row-major), their sums r and
// non-zero counts nnz; rows with nnz <= pack_max are packed. inv holds
// 1 / colmax (0 for columns without a positive entry). `a` and `t` may alias
// (in-place build of T' over an attention buffer).
template <typename in_t, typename acc_t>
static void ers_rows_cpu(const in_t* a, const acc_t* inv, int64_t P, int64_t i0, int64_t i1, acc_t lam,
                         acc_t t_lo, int64_t pack_max, acc_t* t, acc_t* r, int64_t* nnz) {
  std::vector<int32_t> idx;
#ifdef WS_REFINE_X86
  if constexpr (std::is_same_v<in_t, float> && std::is_same_v<acc_t, float>) {
    static const bool avx512 = __builtin_cpu_supports("avx512f");
    if (avx512) {
      for (int64_t i = i0; i < i1; ++i) {
        int64_t n = 0;
        r[i] = ers_row_avx512(a + i * P, inv, P, lam, t_lo, t + i * P, &n);
        nnz[i] = n;
        if (n <= pack_max) pack_row(t + i * P, P, n, idx);
      }
      return;
    }
  }
#endif
  for (int64_t i = i0; i < i1; ++i) {
    const in_t* ai = a + i * P;
    acc_t* ti = t + i * P;
    for (int64_t j = 0; j < P; ++j) ti[j] = static_cast<acc_t>(ai[j]) * inv[j];  // vectorised
    acc_t sum = 0;
    int64_t n = 0;
    for (int64_t j = 0; j < P; ++j) {
      const acc_t tv = ti[j];
      // Below the cut the clamp gives 0: skip the logarithm.
      const acc_t v = tv > t_lo ? (lam == acc_t(0) ? tv : kernels::ers_entry(tv, acc_t(1), lam)) : acc_t(0);
      ti[j] = v;
      sum += v;
      n += v != acc_t(0);
    }
    r[i] = sum;
    nnz[i] = n;
    if (n <= pack_max) pack_row(ti, P, n, idx);
  }
}

// y (P, K) = T' c for a T' whose rows with nnz <= pack_max are packed.
template <typename acc_t>
static void sparse_rows_mm_cpu(const acc_t* t, const int64_t* nnz, int64_t pack_max, const acc_t* c, int64_t P,
                               int64_t K, acc_t* y, int64_t grain) {
  at::parallel_for(0, P, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t* ti = t + i * P;
      acc_t* yi = y + i * K;
      std::fill(yi, yi + K, acc_t(0));
      if (nnz[i] <= pack_max) {
        const int32_t* id = reinterpret_cast<const int32_t*>(ti + nnz[i]);
        for (int64_t m = 0; m < nnz[i]; ++m) {
          const acc_t v = ti[m];
          const acc_t* cj = c + static_cast<int64_t>(id[m]) * K;
          for (int64_t k = 0; k < K; ++k) yi[k] += v * cj[k];
        }
      } else {
        for (int64_t j = 0; j < P; ++j) {
          const acc_t v = ti[j];
          if (v == acc_t(0)) continue;
          const acc_t* cj = c + j * K;
          for (int64_t k = 0; k < K; ++k) yi[k] += v * cj[k];
        }
      }
    }
  });
}

// c = columnwise (y' - min y') / sum(y' - min y'), with y' = y / r per row when r
// is given (rows with r = 0 give 0). y and c are (P, K) row-major; they may alias.
template <typename acc_t>
static void colnorm_cpu(const acc_t* y, const acc_t* r, int64_t P, int64_t K, acc_t* c) {
  std::vector<acc_t> mn(static_cast<size_t>(K), std::numeric_limits<acc_t>::infinity());
  std::vector<acc_t> sm(static_cast<size_t>(K), acc_t(0));
  auto val = [&](int64_t i, int64_t k) { return r ? kernels::row_scaled(y[i * K + k], r[i]) : y[i * K + k]; };
  for (int64_t i = 0; i < P; ++i)
    for (int64_t k = 0; k < K; ++k) mn[k] = kernels::MinOp::apply(mn[k], val(i, k));
  for (int64_t i = 0; i < P; ++i)
    for (int64_t k = 0; k < K; ++k) sm[k] += val(i, k) - mn[k];
  for (int64_t i = 0; i < P; ++i)
    for (int64_t k = 0; k < K; ++k) c[i * K + k] = kernels::col_normalised(val(i, k), mn[k], sm[k]);
}

// Builds T' (in `t`, which may be the attention buffer itself) and r from one
// attention matrix, then propagates maps_b (P, K) into out_b (P, K).
static void propagate_one_cpu(const at::Tensor& a, at::Tensor& t, at::Tensor& r, const at::Tensor& maps_b,
                              double ent, int64_t steps, at::Tensor& y, at::Tensor out_b) {
  const int64_t P = a.size(0), K = maps_b.size(1);
  const auto ct = t.scalar_type();
  AT_DISPATCH_FLOATING_TYPES(ct, "refine_propagate_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t lam = kernels::ers_lambda<acc_t>(ent);
    const acc_t t_lo = static_cast<acc_t>(refine_threshold(ent));
    std::vector<acc_t> inv(static_cast<size_t>(P));
    std::vector<int64_t> nnz(static_cast<size_t>(P));
    acc_t* tp = t.data_ptr<acc_t>();
    acc_t* rp = r.data_ptr<acc_t>();
    // Pack rows of density <= 1/4 (only worth it when there are steps to run).
    const int64_t pack_max = steps > 0 && P >= 64 ? P / 4 : -1;
    // Rows per task: small matrices are built on the calling thread.
    const int64_t row_grain = std::max<int64_t>(16, (int64_t(1) << 18) / P);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "refine_propagate_ers", [&] {
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      colmax_cpu(ap, P, inv.data());
      for (auto& v : inv) v = v > acc_t(0) ? acc_t(1) / v : acc_t(0);
      at::parallel_for(0, P, row_grain, [&](int64_t i0, int64_t i1) {
        ers_rows_cpu(ap, inv.data(), P, i0, i1, lam, t_lo, pack_max, tp, rp, nnz.data());
      });
    });
    // The sparse product pays per stored entry (dense rows count P); a dense GEMM is
    // about 3x more efficient per entry, so it wins above a third of P^2.
    double sparse_cost = 0;
    for (int64_t i = 0; i < P; ++i) sparse_cost += static_cast<double>(nnz[i] <= pack_max ? nnz[i] : P);
    const bool sparse = pack_max >= 0 && 3.0 * sparse_cost < static_cast<double>(P) * static_cast<double>(P);
    if (!sparse && pack_max >= 0) {
      at::parallel_for(0, P, row_grain, [&](int64_t i0, int64_t i1) {
        std::vector<acc_t> val;
        std::vector<int32_t> idx;
        for (int64_t i = i0; i < i1; ++i)
          if (nnz[i] <= pack_max) unpack_row(tp + i * P, P, nnz[i], val, idx);
      });
    }
    // A step of the sparse product costs about sparse_cost * K multiply-adds: below 2^18 it runs
    // on the calling thread.
    const int64_t sparse_grain = sparse_cost * static_cast<double>(K) < double(1 << 18) ? std::max<int64_t>(P, 1) : 32;
    auto m = maps_b.to(ct).contiguous();
    acc_t* c = out_b.data_ptr<acc_t>();
    acc_t* yp = y.data_ptr<acc_t>();
    colnorm_cpu<acc_t>(m.const_data_ptr<acc_t>(), nullptr, P, K, c);
    for (int64_t s = 0; s < steps; ++s) {
      if (sparse) {
        sparse_rows_mm_cpu<acc_t>(tp, nnz.data(), pack_max, c, P, K, yp, sparse_grain);
      } else {
        at::mm_out(y, t, out_b);
      }
      colnorm_cpu<acc_t>(yp, rp, P, K, c);
    }
  });
}

at::Tensor refine_propagate_cpu(const at::Tensor& attn, const at::Tensor& maps, double ent, int64_t steps) {
  check_refine_args(attn, maps, ent, steps);
  const int64_t B = attn.size(0), P = attn.size(1), K = maps.size(2);
  const auto ct = refine_compute_type(attn);
  auto out = at::zeros({B, P, K}, attn.options().dtype(ct));
  if (B == 0 || P == 0 || K == 0) return out;
  auto a = attn.contiguous();
  auto t = at::empty({P, P}, out.options());  // the one P x P buffer, reused for every batch element
  auto r = at::empty({P}, out.options());
  auto y = at::empty({P, K}, out.options());
  for (int64_t b = 0; b < B; ++b) propagate_one_cpu(a[b], t, r, maps[b], ent, steps, y, out[b]);
  return out;
}

at::Tensor refine_propagate_qk_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& maps, double ent,
                                   int64_t steps, double scale) {
  check_refine_qk_args(q, k, maps, ent, steps, scale);
  const int64_t B = q.size(0), H = q.size(1), P = q.size(2), K = maps.size(2);
  const auto ct = refine_compute_type(q);
  auto out = at::zeros({B, P, K}, q.options().dtype(ct));
  if (B == 0 || P == 0 || K == 0) return out;
  auto qs = (q.to(ct) * scale).contiguous();
  auto ks = k.to(ct).contiguous();
  // The head-mean softmax attention is built row block by row block into the
  // one P x P buffer; T' then overwrites it in place.
  auto a = at::empty({P, P}, out.options());
  auto r = at::empty({P}, out.options());
  auto y = at::empty({P, K}, out.options());
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(P, (int64_t(1) << 22) / std::max<int64_t>(1, H * P)));
  for (int64_t b = 0; b < B; ++b) {
    auto kt = ks[b].transpose(1, 2);
    for (int64_t r0 = 0; r0 < P; r0 += R) {
      const int64_t n = std::min(R, P - r0);
      auto s = at::bmm(qs[b].narrow(1, r0, n), kt);  // (H, n, P)
      auto rows = a.narrow(0, r0, n);
      at::mean_out(rows, at::softmax(s, -1), at::IntArrayRef{0});
    }
    propagate_one_cpu(a, a, r, maps[b], ent, steps, y, out[b]);
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(weakseg, m) {
  m.def("refine_propagate(Tensor attn, Tensor maps, float ent, int steps) -> Tensor");
  m.def("refine_propagate_qk(Tensor q, Tensor k, Tensor maps, float ent, int steps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(weakseg, CPU, m) {
  m.impl("refine_propagate", &refine_propagate_cpu);
  m.impl("refine_propagate_qk", &refine_propagate_qk_cpu);
}

}  // namespace ops
}  // namespace weakseg
