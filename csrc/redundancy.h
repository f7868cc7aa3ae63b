// Helpers shared by the redundancy-reduction kernels (cross_correlation_loss.cpp, vicreg_loss.cpp):
// column passes over row-major (N x D) matrices and the product forms of the (D x D) matrices.
//
// Column statistics run in chunks of kChunkCols columns, one chunk per task, each task walking
// every row of its chunk (contiguous kChunkCols-wide reads per row: the inner loops vectorise);
// sums are accumulated in double. The products call the BLAS from the calling thread, so MKL /
// OpenBLAS thread them itself (inside an at::parallel_for task they would run single-threaded).
#pragma once

#include "common.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "blas.h"

namespace sslkern {
namespace redundancy {

constexpr int64_t kChunkCols = 256;

// f(c0, c1) for column chunks [c0, c1) covering [0, D), in parallel.
template <typename F>
inline void for_column_chunks(int64_t D, const F& f) {
  const int64_t n_chunks = (D + kChunkCols - 1) / kChunkCols;
  at::parallel_for(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) f(c * kChunkCols, std::min(D, (c + 1) * kChunkCols));
  });
}

// Σ_n x[n, c] over rows [r0, r1) into out[c - c0] (double), columns [c0, c1), row stride D.
template <typename A>
inline void column_sum(const A* x, int64_t D, int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* out) {
  const int64_t w = c1 - c0;
  std::fill(out, out + w, 0.0);
  for (int64_t n = r0; n < r1; ++n) {
    const A* __restrict row = x + n * D + c0;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) out[j] += static_cast<double>(row[j]);
  }
}

// Σ over `rows` rows of x[n]·y[n] (contiguous rows of D elements), in double, rows in
// parallel, the per-row sums added in a fixed order (deterministic for any thread count).
template <typename A>
inline double dot_rows(const A* x, const A* y, int64_t rows, int64_t D) {
  std::vector<double> part(std::max<int64_t>(rows, 1), 0.0);
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const A* __restrict a = x + n * D;
      const A* __restrict b = y + n * D;
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < D; ++j) s += static_cast<double>(a[j]) * static_cast<double>(b[j]);
      part[n] = s;
    }
  });
  double total = 0.0;
  for (int64_t n = 0; n < rows; ++n) total += part[n];  // fixed order: deterministic
  return total;
}

// Strip width of the tiled forms: (bw x D) strips of the (D x D) matrix.
inline int64_t strip_width(int64_t D) { return std::min<int64_t>(D, 512); }

// The output dtype's copy of an accumulation-type gradient, or the buffer itself.
inline at::Tensor to_dtype(const at::Tensor& g, at::ScalarType dtype) {
  return g.scalar_type() == dtype ? g : g.to(dtype);
}

}  // namespace redundancy
}  // namespace sslkern
