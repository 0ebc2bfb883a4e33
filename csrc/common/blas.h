// The BLAS/LAPACK entry points used by the kernels: scipy-openblas32 (32-bit ints, `scipy_` symbol prefix).
#pragma once

#include <cstdint>
#include <limits>

#include "common/check.h"

extern "C" {
enum PG_CBLAS_ORDER { PgRowMajor = 101, PgColMajor = 102 };
enum PG_CBLAS_TRANSPOSE { PgNoTrans = 111, PgTrans = 112 };
enum PG_CBLAS_UPLO { PgUpper = 121, PgLower = 122 };

void scipy_cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float* a, int lda,
                       const float* b, int ldb, float beta, float* c, int ldc);
void scipy_cblas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha, const double* a, int lda,
                       const double* b, int ldb, double beta, double* c, int ldc);
void scipy_cblas_ssyrk(int order, int uplo, int trans, int n, int k, float alpha, const float* a, int lda, float beta,
                       float* c, int ldc);
void scipy_cblas_dsyrk(int order, int uplo, int trans, int n, int k, double alpha, const double* a, int lda,
                       double beta, double* c, int ldc);

// LAPACK (Fortran interface, column-major).
void scipy_dgeqrf_(const int* m, const int* n, double* a, const int* lda, double* tau, double* work, const int* lwork,
                   int* info);
void scipy_dorgqr_(const int* m, const int* n, const int* k, double* a, const int* lda, const double* tau, double* work,
                   const int* lwork, int* info);
void scipy_dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w, double* work,
                   const int* lwork, int* iwork, const int* liwork, int* info, std::size_t, std::size_t);

void scipy_openblas_set_num_threads(int num_threads);
int scipy_openblas_get_num_threads(void);
char* scipy_openblas_get_config(void);
}

namespace pg {

/// BLAS takes 32-bit dimensions; larger operands are split by the callers or rejected here.
inline int blas_int(int64_t v, const char* what) {
  PG_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), what, " = ", v, " exceeds the BLAS 32-bit index range");
  return static_cast<int>(v);
}

template <typename T>
inline void gemm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta, T* c,
                 int ldc) {
  if constexpr (sizeof(T) == 4) {
    scipy_cblas_sgemm(PgRowMajor, ta ? PgTrans : PgNoTrans, tb ? PgTrans : PgNoTrans, m, n, k, alpha, a, lda, b, ldb,
                      beta, c, ldc);
  } else {
    scipy_cblas_dgemm(PgRowMajor, ta ? PgTrans : PgNoTrans, tb ? PgTrans : PgNoTrans, m, n, k, alpha, a, lda, b, ldb,
                      beta, c, ldc);
  }
}

/// Row-major C[n,n] (upper) = alpha * A^T A + beta * C for A [k, n] with leading dimension lda.
template <typename T>
inline void syrk_ata(int n, int k, T alpha, const T* a, int lda, T beta, T* c, int ldc) {
  if constexpr (sizeof(T) == 4) {
    scipy_cblas_ssyrk(PgRowMajor, PgUpper, PgTrans, n, k, alpha, a, lda, beta, c, ldc);
  } else {
    scipy_cblas_dsyrk(PgRowMajor, PgUpper, PgTrans, n, k, alpha, a, lda, beta, c, ldc);
  }
}

}  // namespace pg
