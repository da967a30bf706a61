// Separable rectangular min/max filters with O(1) work per pixel in the window
// size (van Herk / Gil-Werman), plus the two erosion ops built on them.
//
// Semantics shared by every backend: an image plane of H x W values is filtered
// with a (2*ry+1) x (2*rx+1) window; pixels outside the plane are the identity
// of the reduction (so borders never erode). The 1-D pass works on the
// "extended" line of length n + 2r whose element e is image element e - r (or
// the identity outside the image); it is cut into blocks of k = 2r+1 elements,
// G[e] is the running reduction from the start of e's block to e, Hs[e] the
// running reduction from e to the end of its block, and the window that starts
// at extended index y (= covers image elements y-r .. y+r) reduces to
// op(Hs[y], G[y+k-1]).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "kernels/common.h"

namespace weakseg {
namespace kernels {

// Running reductions of block b of the extended column tile: prefix into g0,
// suffix into h0 (k rows of `cols` each). Everything is passed by value: with
// byte-sized T every store may alias anything reached through a pointer, which
// would stop the vectoriser (a lambda capturing by reference does exactly that).
template <typename T, typename Op>
void vanherk_block(const T* in, int64_t in_stride, int64_t n, int64_t r, int64_t cols, T identity, int64_t b,
                   T* __restrict__ g0, T* __restrict__ h0) {
  const int64_t k = 2 * r + 1, m = n + 2 * r;
  const int64_t e0 = b * k, e1 = std::min(m, e0 + k);
  for (int64_t e = e0; e < e1; ++e) {
    T* __restrict__ g = g0 + (e - e0) * cols;
    const T* __restrict__ f = (e < r || e >= n + r) ? nullptr : in + (e - r) * in_stride;
    if (e == e0) {
      if (f) std::memcpy(g, f, cols * sizeof(T));
      else std::fill(g, g + cols, identity);
    } else {
      const T* __restrict__ gp = g - cols;
      if (f) for (int64_t x = 0; x < cols; ++x) g[x] = Op::apply(gp[x], f[x]);
      else std::memcpy(g, gp, cols * sizeof(T));
    }
  }
  for (int64_t e = e1 - 1; e >= e0; --e) {
    T* __restrict__ h = h0 + (e - e0) * cols;
    const T* __restrict__ f = (e < r || e >= n + r) ? nullptr : in + (e - r) * in_stride;
    if (e == e1 - 1) {
      if (f) std::memcpy(h, f, cols * sizeof(T));
      else std::fill(h, h + cols, identity);
    } else {
      const T* __restrict__ hn = h + cols;
      if (f) for (int64_t x = 0; x < cols; ++x) h[x] = Op::apply(hn[x], f[x]);
      else std::memcpy(h, hn, cols * sizeof(T));
    }
  }
}

// out[x] = op(h[x], g[x]) over one row of the tile.
template <typename T, typename Op>
inline void combine_row(const T* __restrict__ h, const T* __restrict__ g, T* __restrict__ o, int64_t cols) {
  for (int64_t x = 0; x < cols; ++x) o[x] = Op::apply(h[x], g[x]);
}

// Columns per tile of the vertical pass (every backend's CPU loop uses it).
constexpr int64_t kVanherkTile = 256;

// Scratch elements vanherk_columns needs for a tile of `cols` columns.
inline int64_t vanherk_scratch(int64_t r, int64_t cols) { return 4 * (2 * r + 1) * cols; }

// Vertical pass over a tile of `cols` adjacent columns of a row-major plane.
// in: element (y, x) at in[y * in_stride + x]; out likewise with out_stride.
// The extended column is processed one k-row block at a time, keeping the
// running reductions of two blocks (the one being emitted and the next) in
// `scratch` (vanherk_scratch(r, cols) elements), so it stays in cache. Every
// inner loop runs over contiguous columns and is vectorised.
template <typename T, typename Op>
void vanherk_columns(const T* in, int64_t in_stride, T* out, int64_t out_stride, int64_t n, int64_t cols,
                     int64_t r, T identity, T* scratch) {
  if (n <= 0 || cols <= 0) return;
  if (r == 0) {
    for (int64_t y = 0; y < n; ++y) std::memcpy(out + y * out_stride, in + y * in_stride, cols * sizeof(T));
    return;
  }
  const int64_t k = 2 * r + 1;
  const int64_t nb = ceil_div(n + 2 * r, k);
  const int64_t slot = k * cols;  // one block of running reductions
  T* G = scratch;                 // G + (b % 2) * slot: prefix reductions of block b
  T* Hs = scratch + 2 * slot;     // Hs + (b % 2) * slot: suffix reductions of block b
  vanherk_block<T, Op>(in, in_stride, n, r, cols, identity, 0, G, Hs);
  for (int64_t b = 0; b * k < n; ++b) {
    if (b + 1 < nb) vanherk_block<T, Op>(in, in_stride, n, r, cols, identity, b + 1, G + ((b + 1) & 1) * slot,
                                         Hs + ((b + 1) & 1) * slot);
    // Output y covers extended rows y .. y+k-1: the suffix of y's block and the
    // prefix up to y+k-1, which lies in block b or b+1.
    const int64_t y1 = std::min(n, (b + 1) * k);
    for (int64_t y = b * k; y < y1; ++y) {
      const int64_t e = y + k - 1;
      combine_row<T, Op>(Hs + (b & 1) * slot + (y - b * k) * cols, G + ((e / k) & 1) * slot + (e % k) * cols,
                         out + y * out_stride, cols);
    }
  }
}

// Transpose of the block rows [r0, r1) x cols [c0, c1) of a rows x cols plane
// (src row-major) into dst (cols x rows), scalar.
template <typename T>
inline void transpose_block(const T* src, T* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1, int64_t c0,
                            int64_t c1) {
  for (int64_t i = r0; i < r1; ++i)
    for (int64_t j = c0; j < c1; ++j) dst[j * rows + i] = src[i * cols + j];
}

#if defined(__SSE2__)
// 16 x 16 bytes: four rounds of unpacks leave column bitrev4(i) in register i.
inline void transpose16x16_u8(const uint8_t* s, int64_t ss, uint8_t* d, int64_t ds) {
  static constexpr int kPerm[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  __m128i x[16], y[16];
  for (int i = 0; i < 16; ++i) x[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i * ss));
  for (int i = 0; i < 8; ++i) { y[i] = _mm_unpacklo_epi8(x[2 * i], x[2 * i + 1]); y[i + 8] = _mm_unpackhi_epi8(x[2 * i], x[2 * i + 1]); }
  for (int i = 0; i < 8; ++i) { x[i] = _mm_unpacklo_epi16(y[2 * i], y[2 * i + 1]); x[i + 8] = _mm_unpackhi_epi16(y[2 * i], y[2 * i + 1]); }
  for (int i = 0; i < 8; ++i) { y[i] = _mm_unpacklo_epi32(x[2 * i], x[2 * i + 1]); y[i + 8] = _mm_unpackhi_epi32(x[2 * i], x[2 * i + 1]); }
  for (int i = 0; i < 8; ++i) { x[i] = _mm_unpacklo_epi64(y[2 * i], y[2 * i + 1]); x[i + 8] = _mm_unpackhi_epi64(y[2 * i], y[2 * i + 1]); }
  for (int i = 0; i < 16; ++i) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + kPerm[i] * ds), x[i]);
}
#endif

// Transpose of the row band [r0, r1) of a rows x cols plane into dst (cols x rows).
template <typename T>
inline void transpose_rows(const T* src, T* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1) {
  constexpr int64_t TB = 32;
  for (int64_t i0 = r0; i0 < r1; i0 += TB)
    for (int64_t j0 = 0; j0 < cols; j0 += TB)
      transpose_block(src, dst, rows, cols, i0, std::min(r1, i0 + TB), j0, std::min(cols, j0 + TB));
}

#if defined(__SSE2__)
template <>
inline void transpose_rows<uint8_t>(const uint8_t* src, uint8_t* dst, int64_t rows, int64_t cols, int64_t r0,
                                    int64_t r1) {
  int64_t i = r0;
  const int64_t cfull = cols - cols % 16;
  for (; i + 16 <= r1; i += 16) {
    for (int64_t j = 0; j < cfull; j += 16) transpose16x16_u8(src + i * cols + j, cols, dst + j * rows + i, rows);
    transpose_block(src, dst, rows, cols, i, i + 16, cfull, cols);
  }
  transpose_block(src, dst, rows, cols, i, r1, 0, cols);
}
#endif

template <typename T>
void transpose_plane(const T* src, T* dst, int64_t rows, int64_t cols) {
  transpose_rows(src, dst, rows, cols, 0, rows);
}

// Column-tiled vertical filter of a whole plane (single thread).
template <typename T, typename Op>
void filter_vertical_plane(const T* in, T* out, int64_t H, int64_t W, int64_t r, T identity,
                           std::vector<T>& scratch) {
  scratch.resize(static_cast<size_t>(vanherk_scratch(r, std::min<int64_t>(kVanherkTile, W))));
  for (int64_t x0 = 0; x0 < W; x0 += kVanherkTile) {
    const int64_t cols = std::min(kVanherkTile, W - x0);
    vanherk_columns<T, Op>(in + x0, W, out + x0, W, H, cols, r, identity, scratch.data());
  }
}

// Full 2-D rectangular filter of one H x W plane: vertical pass, then the
// horizontal pass done as a vertical pass on the transpose.
// tmp: H*W scratch; `out` may not alias `in`.
template <typename T, typename Op>
void filter_plane(const T* in, T* out, int64_t H, int64_t W, int64_t ry, int64_t rx, T identity,
                  std::vector<T>& tmp, std::vector<T>& tmp2, std::vector<T>& scratch) {
  tmp.resize(static_cast<size_t>(H * W));
  tmp2.resize(static_cast<size_t>(H * W));
  filter_vertical_plane<T, Op>(in, out, H, W, ry, identity, scratch);  // out = vertical(in)
  if (rx == 0) return;
  transpose_plane(out, tmp.data(), H, W);                               // tmp: W x H
  filter_vertical_plane<T, Op>(tmp.data(), tmp2.data(), W, H, rx, identity, scratch);
  transpose_plane(tmp2.data(), out, W, H);
}

}  // namespace kernels
}  // namespace weakseg
