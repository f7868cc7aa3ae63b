// Row-major GEMM on the Fortran BLAS that libtorch_cpu links and exports (MKL or OpenBLAS),
// for kernels that multiply tiles inside their own parallel tasks (ATen declares these
// symbols the same way; at::cpublas::gemm is not exported to extensions).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);
extern "C" void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                       const double* a, const int* lda, const double* b, const int* ldb, const double* beta,
                       double* c, const int* ldc);

namespace sslkern {

// C[m×n] = alpha·op(A)[m×k]·op(B)[k×n] + beta·C, all row-major (op = transpose when ta / tb).
// BLAS is column-major and a row-major matrix is its column-major transpose, so this computes
// Cᵀ = op(B)ᵀ·op(A)ᵀ. float or double; sizes must fit in int (callers tile).
template <typename T>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                 int64_t ldb, T beta, T* c, int64_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "gemm: float or double");
  if (m == 0 || n == 0) return;
  const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LA = static_cast<int>(std::max<int64_t>(ldb, 1)), LB = static_cast<int>(std::max<int64_t>(lda, 1));
  const int LC = static_cast<int>(std::max<int64_t>(ldc, 1));
  if constexpr (std::is_same_v<T, double>) dgemm_(&tA, &tB, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
  else sgemm_(&tA, &tB, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
}

}  // namespace sslkern
