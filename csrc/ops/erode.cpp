// erode / erode_labels: schema, input checks and CPU implementation (below; the CUDA
// kernel bodies are in kernels/erode.h, the launcher in cuda/erode.cu).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "csrc/ops/common.h"
#include "csrc/ops/erode.h"

namespace weakseg {
namespace ops {

// ---------------------------------------------------------------------------------------------
// CPU path: a separable min filter of uint8 planes, window rows [y + ylo, y + yhi] and columns
// [x + xlo, x + xhi] (pixels outside the plane are the identity 255, i.e. ignored). Each thread
// takes a band of output rows (or whole planes when there are many) and emits them in order:
// the vertical pass gives one row of column minima (a direct min of the rows for short windows,
// else a streaming van Herk / Gil-Werman pass: suffix minima of the current block of rows and a
// running prefix minimum of the next, 3 row operations per output row whatever the window), and
// the horizontal pass turns it into the output row at once, while it is in L1 (a direct min of
// shifted rows for short windows, else log2(w) doubling steps of shifted-row minima). Every
// inner loop runs over contiguous bytes and is compiled for AVX-512BW / AVX2 / SSE2 (runtime
// dispatch). Label maps (erode_labels) reduce to two such filters of uint8 "equal neighbour" maps.

namespace {

constexpr uint8_t kId = 255;  // identity of min over uint8 (and of "equal neighbours")

#define WS_AI __attribute__((always_inline)) inline

WS_AI void min2(uint8_t* __restrict o, const uint8_t* __restrict a, const uint8_t* __restrict b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = a[i] < b[i] ? a[i] : b[i];
}
WS_AI void min3(uint8_t* __restrict o, const uint8_t* __restrict a, const uint8_t* __restrict b,
                const uint8_t* __restrict c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t m = a[i] < b[i] ? a[i] : b[i];
    o[i] = m < c[i] ? m : c[i];
  }
}
WS_AI void min_into(uint8_t* __restrict o, const uint8_t* __restrict a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = a[i] < o[i] ? a[i] : o[i];
}

// Per-thread buffers (kept across calls; released after a call that needed more than 16 MiB).
struct Bufs {
  std::vector<uint8_t> ident, suf, pre, ext, a, b;
  void trim() {
    for (auto* v : {&ident, &suf, &pre, &ext, &a, &b})
      if (v->capacity() > (size_t(16) << 20)) std::vector<uint8_t>().swap(*v);
  }
};
Bufs& bufs() {
  thread_local Bufs b;
  return b;
}

struct Window {
  int64_t ylo, yhi, xlo, xhi;  // inclusive offsets, clamped to [-(H-1), H-1] / [-(W-1), W-1]
};

// Output rows [y0, y1) of one H x W plane. Buffers sized by prepare_bufs.
WS_AI void filter_band_body(const uint8_t* in, uint8_t* out, int64_t H, int64_t W, int64_t y0, int64_t y1,
                            Window win, Bufs& bf) {
  const int64_t wy = win.yhi - win.ylo + 1, wx = win.xhi - win.xlo + 1;
  const uint8_t* ident = bf.ident.data();
  auto row_at = [&](int64_t r) -> const uint8_t* { return (r >= 0 && r < H) ? in + r * W : ident; };
  // Horizontal pass of one row of column minima held in ext + pad (pad = -xlo clamped at 0 bytes of
  // identity before it, identity after it) into dst.
  const int64_t pad = std::max<int64_t>(0, -win.xlo);
  uint8_t* ext = bf.ext.data();
  const int64_t ext_off = pad + win.xlo;  // ext index of window start of x = 0 (>= 0)
  auto horizontal = [&](uint8_t* dst) {
    const uint8_t* e = ext + ext_off;  // out[x] = min(e[x .. x + wx - 1])
    if (wx == 1) {
      std::memcpy(dst, e, static_cast<size_t>(W));
    } else if (wx == 2) {
      min2(dst, e, e + 1, W);
    } else if (wx == 3) {
      min3(dst, e, e + 1, e + 2, W);
    } else {
      // Doubling: after step j, cur[i] = min(e[i .. i + 2^j - 1]), valid for i < len - 2^j + 1.
      int64_t d = 1, n = W + wx - 1;
      const uint8_t* cur = e;
      uint8_t* bufs2[2] = {bf.a.data(), bf.b.data()};
      int which = 0;
      while (2 * d <= wx) {
        n -= d;
        uint8_t* nxt = bufs2[which];
        which ^= 1;
        min2(nxt, cur, cur + d, n);
        cur = nxt;
        d *= 2;
      }
      min2(dst, cur, cur + (wx - d), W);
    }
  };
  // Destination of the vertical pass: the middle of ext (its padding stays identity), or the
  // output row itself when the window is one column wide.
  auto vdst = [&](int64_t y) -> uint8_t* { return wx == 1 ? out + y * W : ext + pad; };
  auto emit = [&](int64_t y) {
    if (wx != 1) horizontal(out + y * W);
  };
  if (wy <= 3) {
    for (int64_t y = y0; y < y1; ++y) {
      uint8_t* v = vdst(y);
      const int64_t r = y + win.ylo;
      if (wy == 1) std::memcpy(v, row_at(r), static_cast<size_t>(W));
      else if (wy == 2) min2(v, row_at(r), row_at(r + 1), W);
      else min3(v, row_at(r), row_at(r + 1), row_at(r + 2), W);
      emit(y);
    }
    return;
  }
  // Streaming van Herk: blocks of wy rows starting at s0 = y0 + ylo. For output y with window
  // start s = bs + i in block [bs, bs + wy): min(suffix_i of the block, prefix_{i-1} of the next).
  uint8_t* suf = bf.suf.data();
  uint8_t* pre = bf.pre.data();
  for (int64_t bs = y0 + win.ylo; bs < y1 + win.ylo; bs += wy) {
    const int64_t i_end = std::min(wy, y1 + win.ylo - bs);  // outputs of this block
    // Suffix minima of the whole block (output i = 0 needs all of them).
    std::memcpy(suf + (wy - 1) * W, row_at(bs + wy - 1), static_cast<size_t>(W));
    for (int64_t i = wy - 2; i >= 0; --i) min2(suf + i * W, suf + (i + 1) * W, row_at(bs + i), W);
    for (int64_t i = 0; i < i_end; ++i) {
      const int64_t y = bs - win.ylo + i;
      uint8_t* v = vdst(y);
      if (i == 0) {
        std::memcpy(v, suf, static_cast<size_t>(W));
      } else {
        const uint8_t* r = row_at(bs + wy + i - 1);
        if (i == 1) std::memcpy(pre, r, static_cast<size_t>(W));
        else min_into(pre, r, W);
        min2(v, suf + i * W, pre, W);
      }
      emit(y);
    }
  }
}

void filter_band_generic(const uint8_t* in, uint8_t* out, int64_t H, int64_t W, int64_t y0, int64_t y1, Window w,
                         Bufs& b) {
  filter_band_body(in, out, H, W, y0, y1, w, b);
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WS_ERODE_X86 1
__attribute__((target("avx2"))) void filter_band_avx2(const uint8_t* in, uint8_t* out, int64_t H, int64_t W,
                                                        int64_t y0, int64_t y1, Window w, Bufs& b) {
  filter_band_body(in, out, H, W, y0, y1, w, b);
}
__attribute__((target("avx512f,avx512bw,avx512vl,prefer-vector-width=512"))) void filter_band_avx512(
    const uint8_t* in, uint8_t* out, int64_t H, int64_t W, int64_t y0, int64_t y1, Window w, Bufs& b) {
  filter_band_body(in, out, H, W, y0, y1, w, b);
}
#endif

using BandFn = void (*)(const uint8_t*, uint8_t*, int64_t, int64_t, int64_t, int64_t, Window, Bufs&);
BandFn pick_band() {
#ifdef WS_ERODE_X86
  if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) return filter_band_avx512;
  if (__builtin_cpu_supports("avx2")) return filter_band_avx2;
#endif
  return filter_band_generic;
}

void prepare_bufs(Bufs& b, int64_t W, const Window& w) {
  const int64_t wy = w.yhi - w.ylo + 1, wx = w.xhi - w.xlo + 1;
  b.ident.assign(static_cast<size_t>(W), kId);
  if (wy > 3) {
    b.suf.resize(static_cast<size_t>(wy * W));
    b.pre.resize(static_cast<size_t>(W));
  }
  const int64_t pad = std::max<int64_t>(0, -w.xlo);
  const int64_t ext_n = pad + W + std::max<int64_t>(0, w.xhi) + 64;
  b.ext.assign(static_cast<size_t>(ext_n), kId);  // padding identity; the middle is rewritten per row
  if (wx > 3) {
    b.a.resize(static_cast<size_t>(W + wx));
    b.b.resize(static_cast<size_t>(W + wx));
  }
}

// Min filter of `planes` H x W uint8 planes with the window offsets (ylo..yhi, xlo..xhi); an
// empty window (lo > hi) gives the identity everywhere.
void min_filter_u8(const uint8_t* in, uint8_t* out, int64_t planes, int64_t H, int64_t W, int64_t ylo, int64_t yhi,
                   int64_t xlo, int64_t xhi) {
  static const BandFn band = pick_band();
  if (planes * H * W == 0) return;
  Window win{std::max(ylo, -(H - 1)), std::min(yhi, H - 1), std::max(xlo, -(W - 1)), std::min(xhi, W - 1)};
  if (win.ylo > win.yhi || win.xlo > win.xhi) {
    std::memset(out, kId, static_cast<size_t>(planes * H * W));
    return;
  }
  const int64_t plane = H * W;
  const int64_t threads = at::get_num_threads();
  // Small jobs run on the calling thread: a parallel region costs more than they do. Work in
  // row passes per pixel: the vertical (w - 1 direct, else 3) and horizontal (w - 1 direct, else
  // the doubling steps + 1) passes and the copy.
  auto passes = [](int64_t w) {
    if (w <= 3) return w - 1;
    int64_t n = 1;
    while ((int64_t(2) << n) <= w) ++n;
    return n + 1;
  };
  const int64_t work = planes * plane * (std::min<int64_t>(passes(win.yhi - win.ylo + 1), 3) +
                                         passes(win.xhi - win.xlo + 1) + 1);
  const bool serial = threads <= 1 || work < (int64_t(1) << 21);
  if (serial || planes >= threads) {
    auto body = [&](int64_t p0, int64_t p1) {
      auto& b = bufs();
      prepare_bufs(b, W, win);
      for (int64_t p = p0; p < p1; ++p) band(in + p * plane, out + p * plane, H, W, 0, H, win, b);
      b.trim();
    };
    if (serial) body(0, planes);
    else at::parallel_for(0, planes, 1, body);
    return;
  }
  // Few large planes: bands of rows of each plane in parallel.
  for (int64_t p = 0; p < planes; ++p) {
    at::parallel_for(0, H, 16, [&](int64_t y0, int64_t y1) {
      auto& b = bufs();
      prepare_bufs(b, W, win);
      band(in + p * plane, out + p * plane, H, W, y0, y1, win, b);
      b.trim();
    });
  }
}

}  // namespace

static void check_plane_shape(const at::Tensor& t, const char* name, const char* op) {
  WS_CHECK(t.dim() >= 2, op, "expected ", name, " of shape (..., H, W), got ", shape_str(t));
}

void check_erode_mask(const at::Tensor& mask) {
  check_plane_shape(mask, "mask", "erode");
  WS_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte, "erode",
           "expected mask of dtype bool or uint8, got ", mask.scalar_type());
}

at::Tensor erode_cpu(const at::Tensor& mask, c10::IntArrayRef kernel_size, int64_t iterations) {
  check_erode_mask(mask);
  auto [ry, rx] = window_radius(kernel_size, iterations, "erode");
  auto src = mask.contiguous();
  auto out = at::empty_like(src);
  if (src.numel() == 0) return out;
  const int64_t H = src.size(-2), W = src.size(-1), planes = src.numel() / (H * W);
  ry = std::min(ry, H), rx = std::min(rx, W);  // a window past the image covers all of it
  // bool is stored as one byte 0/1; 255 is the identity of min for both dtypes.
  min_filter_u8(static_cast<const uint8_t*>(src.data_ptr()), static_cast<uint8_t*>(out.data_ptr()), planes, H, W,
                -ry, ry, -rx, rx);
  return out;
}

// A label survives iff every in-image pixel of its window has its label, i.e. (the window being
// a rectangle, hence connected) iff every pair of horizontally and every pair of vertically
// adjacent pixels inside the window is equal. eq_h(y, x) = [L(y, x) == L(y, x + 1)] (255/0,
// identity past the last column) must hold over rows y-ry..y+ry and columns x-rx..x+rx-1;
// eq_v(y, x) = [L(y, x) == L(y + 1, x)] over rows y-ry..y+ry-1 and columns x-rx..x+rx. Two uint8
// min filters replace one erosion per class (or a min and a max filter of the labels).
template <typename T>
void erode_labels_typed(const at::Tensor& src, at::Tensor& out, int64_t ry, int64_t rx, int64_t ignore_index) {
  const int64_t H = src.size(-2), W = src.size(-1), planes = src.numel() / (H * W);
  ry = std::min(ry, H), rx = std::min(rx, W);
  const T* in = src.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const T ign = static_cast<T>(ignore_index);
  const int64_t plane = H * W, total = planes * plane;
  if (ry == 0 && rx == 0) {
    std::memcpy(o, in, static_cast<size_t>(total) * sizeof(T));
    return;
  }
  std::vector<uint8_t> eqh(static_cast<size_t>(rx > 0 ? total : 0)), eqv(static_cast<size_t>(ry > 0 ? total : 0));
  const int64_t rows = planes * H;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(W, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* l = in + r * W;
      if (rx > 0) {
        uint8_t* e = eqh.data() + r * W;
        for (int64_t x = 0; x + 1 < W; ++x) e[x] = l[x] == l[x + 1] ? kId : 0;
        e[W - 1] = kId;
      }
      if (ry > 0) {
        uint8_t* e = eqv.data() + r * W;
        if (r % H == H - 1) {
          std::memset(e, kId, static_cast<size_t>(W));
        } else {
          const T* l2 = l + W;
          for (int64_t x = 0; x < W; ++x) e[x] = l[x] == l2[x] ? kId : 0;
        }
      }
    }
  });
  std::vector<uint8_t> fh(static_cast<size_t>(rx > 0 ? total : 0)), fv(static_cast<size_t>(ry > 0 ? total : 0));
  if (rx > 0) min_filter_u8(eqh.data(), fh.data(), planes, H, W, -ry, ry, -rx, rx - 1);
  if (ry > 0) min_filter_u8(eqv.data(), fv.data(), planes, H, W, -ry, ry - 1, -rx, rx);
  at::parallel_for(0, total, int64_t(1) << 16, [&](int64_t i0, int64_t i1) {
    if (rx > 0 && ry > 0) {
      for (int64_t i = i0; i < i1; ++i) o[i] = (fh[i] & fv[i]) ? in[i] : ign;
    } else {
      const uint8_t* f = rx > 0 ? fh.data() : fv.data();
      for (int64_t i = i0; i < i1; ++i) o[i] = f[i] ? in[i] : ign;
    }
  });
}

static void check_ignore_index(at::ScalarType st, int64_t ignore_index, const char* op) {
  int64_t lo = 0, hi = 0;
  switch (st) {
    case at::kByte: lo = 0; hi = 255; break;
    case at::kInt: lo = std::numeric_limits<int32_t>::min(); hi = std::numeric_limits<int32_t>::max(); break;
    default: lo = std::numeric_limits<int64_t>::min(); hi = std::numeric_limits<int64_t>::max();
  }
  WS_CHECK(ignore_index >= lo && ignore_index <= hi, op, "ignore_index ", ignore_index,
           " does not fit the labels' dtype ", st);
}

void check_erode_labels_args(const at::Tensor& labels, int64_t ignore_index) {
  const char* op = "erode_labels";
  check_plane_shape(labels, "labels", op);
  const auto st = labels.scalar_type();
  WS_CHECK(st == at::kLong || st == at::kInt || st == at::kByte, op,
           "expected labels of dtype int64, int32 or uint8, got ", st);
  check_ignore_index(st, ignore_index, op);
}

at::Tensor erode_labels_cpu(const at::Tensor& labels, c10::IntArrayRef kernel_size, int64_t iterations,
                            int64_t ignore_index) {
  check_erode_labels_args(labels, ignore_index);
  auto [ry, rx] = window_radius(kernel_size, iterations, "erode_labels");
  auto src = labels.contiguous();
  auto out = at::empty_like(src);
  if (src.numel() == 0) return out;
  switch (src.scalar_type()) {
    case at::kLong: erode_labels_typed<int64_t>(src, out, ry, rx, ignore_index); break;
    case at::kInt: erode_labels_typed<int32_t>(src, out, ry, rx, ignore_index); break;
    default: erode_labels_typed<uint8_t>(src, out, ry, rx, ignore_index); break;
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(weakseg, m) {
  m.def("erode(Tensor mask, int[2] kernel_size, int iterations=1) -> Tensor");
  m.def("erode_labels(Tensor labels, int[2] kernel_size, int iterations=1, int ignore_index=255) -> Tensor");
}

TORCH_LIBRARY_IMPL(weakseg, CPU, m) {
  m.impl("erode", &erode_cpu);
  m.impl("erode_labels", &erode_labels_cpu);
}

}  // namespace ops
}  // namespace weakseg
