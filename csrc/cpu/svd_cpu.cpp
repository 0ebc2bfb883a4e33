#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/blas.h"
#include "common/check.h"
#include "common/parallel.h"
#include "svd.h"

extern "C" void scipy_dsyevr_(const char* jobz, const char* range, const char* uplo, const int* n, double* a,
                              const int* lda, const double* vl, const double* vu, const int* il, const int* iu,
                              const double* abstol, int* m, double* w, double* z, const int* ldz, int* isuppz,
                              double* work, const int* lwork, int* iwork, const int* liwork, int* info, std::size_t,
                              std::size_t, std::size_t);

namespace pg {

namespace {

// A block of rows of A usable by BLAS: a pointer into A when its layout allows, else packed into `buf`.
template <typename Tag>
const typename Tag::compute* rows_for_blas(const MatrixView& a, int64_t r0, int64_t nr,
                                           std::vector<typename Tag::compute>& buf, int* lda) {
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  const int64_t n = a.cols;
  if constexpr (std::is_same_v<S, C>) {
    if (a.col_stride == 1 && a.row_stride >= n && a.row_stride <= std::numeric_limits<int>::max()) {
      *lda = static_cast<int>(a.row_stride);
      return a.row<S>(r0);
    }
  }
  buf.resize(static_cast<size_t>(nr) * n);
  for (int64_t r = 0; r < nr; ++r) {
    const S* src = a.row<S>(r0 + r);
    C* dst = buf.data() + r * n;
    for (int64_t j = 0; j < n; ++j) dst[j] = load(Tag{}, src + j * a.col_stride);
  }
  *lda = blas_int(n, "n_features");
  return buf.data();
}

// Rows per block: big enough for efficient BLAS, small enough that the block stays in L2 between its two uses.
int64_t block_rows(int64_t n, int64_t bytes_per_elem, int64_t target_bytes) {
  return std::clamp<int64_t>(target_bytes / std::max<int64_t>(1, n * bytes_per_elem), 8, 8192);
}

template <typename Tag>
void gram_impl(const MatrixView& a, double* out) {
  using C = typename Tag::compute;
  const int64_t m = a.rows, n = a.cols;
  std::fill(out, out + n * n, 0.0);
  const int64_t rows = 4096;  // fp32 sums of at most this many products before the fp64 add
  std::vector<C> block, part(static_cast<size_t>(n) * n);
  const int nb = blas_int(n, "n_features");
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t nr = std::min(rows, m - r0);
    int lda = 0;
    const C* p = rows_for_blas<Tag>(a, r0, nr, block, &lda);
    syrk_ata<C>(nb, blas_int(nr, "rows"), C(1), p, lda, C(0), part.data(), nb);
    for_upper_rows(n, [&](int64_t i) {
      for (int64_t j = i; j < n; ++j) out[i * n + j] += static_cast<double>(part[i * n + j]);
    });
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) out[i * n + j] = out[j * n + i];
}

// One read of A, block by block: y_b = A_b q (stored when y is given), then A_b^T y_b summed into z and/or
// y_b^T y_b summed into yty (fp64 sums of fp32 block products).
template <typename Tag>
void power_pass_impl(const MatrixView& a, const void* qv, int64_t l, double* z, void* yv, double* yty) {
  using C = typename Tag::compute;
  const int64_t m = a.rows, n = a.cols;
  const C* q = static_cast<const C*>(qv);
  C* y_out = static_cast<C*>(yv);
  const bool want_z = z != nullptr, want_g = yty != nullptr;
  const int64_t zsize = want_z ? n * l : 0, gsize = want_g ? l * l : 0;
  const int T = parallel_ranges(m, 64);
  std::vector<std::vector<double>> zacc(T), gacc(T);
  const int64_t br = block_rows(n, sizeof(C), int64_t{1} << 20);
  const int li = blas_int(l, "l"), ni = blas_int(n, "n_features");
  SingleThreadedBlas single(T > 1);
  parallel_for(m, 64, [&](int t, int64_t b, int64_t e) {
    std::vector<C> block, ytmp(y_out ? 0 : static_cast<size_t>(br) * l), zpart(zsize), gpart(gsize);
    zacc[t].assign(zsize, 0.0);
    gacc[t].assign(gsize, 0.0);
    for (int64_t r0 = b; r0 < e; r0 += br) {
      const int64_t nr = std::min(br, e - r0);
      const int nri = blas_int(nr, "rows");
      int lda = 0;
      const C* p = rows_for_blas<Tag>(a, r0, nr, block, &lda);
      C* yb = y_out ? y_out + r0 * l : ytmp.data();
      gemm<C>(false, false, nri, li, ni, C(1), p, lda, q, li, C(0), yb, li);  // y_b = A_b q
      if (want_z) {
        gemm<C>(true, false, ni, li, nri, C(1), p, lda, yb, li, C(0), zpart.data(), li);  // A_b^T y_b
        for (int64_t i = 0; i < zsize; ++i) zacc[t][i] += static_cast<double>(zpart[i]);
      }
      if (want_g) {
        syrk_ata<C>(li, nri, C(1), yb, li, C(0), gpart.data(), li);  // y_b^T y_b (upper)
        for (int64_t i = 0; i < gsize; ++i) gacc[t][i] += static_cast<double>(gpart[i]);
      }
    }
  });
  if (want_z) {
    std::fill(z, z + zsize, 0.0);
    for (int t = 0; t < T; ++t)
      for (int64_t i = 0; i < zsize; ++i) z[i] += zacc[t][i];
  }
  if (want_g) {
    std::fill(yty, yty + gsize, 0.0);
    for (int t = 0; t < T; ++t)
      for (int64_t i = 0; i < gsize; ++i) yty[i] += gacc[t][i];
    for (int64_t i = 0; i < l; ++i)
      for (int64_t j = 0; j < i; ++j) yty[i * l + j] = yty[j * l + i];
  }
}

}  // namespace

void gram_cpu(const MatrixView& a, double* out) {
  if (a.cols == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) { gram_impl<decltype(tag)>(a, out); });
}

void power_pass_cpu(const MatrixView& a, const void* q, int64_t l, double* z) {
  std::fill(z, z + a.cols * l, 0.0);
  if (a.rows == 0 || a.cols == 0 || l == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) { power_pass_impl<decltype(tag)>(a, q, l, z, nullptr, nullptr); });
}

void project_cpu(const MatrixView& a, const void* q, int64_t l, void* y, double* yty) {
  std::fill(yty, yty + l * l, 0.0);
  if (a.rows == 0 || l == 0) return;
  if (a.cols == 0) {
    std::memset(y, 0, static_cast<size_t>(a.rows * l) * (a.dtype == DType::float64 ? 8 : 4));
    return;
  }
  dispatch_dtype(a.dtype, [&](auto tag) { power_pass_impl<decltype(tag)>(a, q, l, nullptr, y, yty); });
}

void orthonormalize_cpu(double* q, int64_t n, int64_t l) {
  PG_CHECK(n >= l, "orthonormalize needs at least as many rows as columns, got [", n, ", ", l, "]");
  if (l == 0) return;
  // Small problem: keep OpenBLAS's pool asleep (waking it here slowed the next fused pass by ~50%).
  SingleThreadedBlas single(true);
  const int ni = blas_int(n, "rows"), li = blas_int(l, "cols");
  // LAPACK is column-major: transpose into a [l][n] column-major copy.
  std::vector<double> a(static_cast<size_t>(n) * l), tau(l);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < l; ++j) a[j * n + i] = q[i * l + j];
  int info = 0, lwork = -1;
  double wq = 0;
  scipy_dgeqrf_(&ni, &li, a.data(), &ni, tau.data(), &wq, &lwork, &info);
  lwork = std::max(1, static_cast<int>(wq));
  std::vector<double> work(lwork);
  scipy_dgeqrf_(&ni, &li, a.data(), &ni, tau.data(), work.data(), &lwork, &info);
  PG_CHECK(info == 0, "LAPACK dgeqrf failed with info=", info);
  lwork = -1;
  scipy_dorgqr_(&ni, &li, &li, a.data(), &ni, tau.data(), &wq, &lwork, &info);
  lwork = std::max(1, static_cast<int>(wq));
  work.resize(lwork);
  scipy_dorgqr_(&ni, &li, &li, a.data(), &ni, tau.data(), work.data(), &lwork, &info);
  PG_CHECK(info == 0, "LAPACK dorgqr failed with info=", info);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < l; ++j) q[i * l + j] = a[j * n + i];
}

void eigh_top_cpu(const double* c, int64_t d, int64_t k, double* w, double* v) {
  PG_CHECK(k >= 0 && k <= d, "k must be in [0, ", d, "], got ", k);
  if (k == 0) return;
  const int di = blas_int(d, "d");
  SingleThreadedBlas single(d <= 1024);  // see orthonormalize_cpu
  // Row-major upper == column-major lower of the same buffer.
  std::vector<double> a(c, c + d * d);
  const int il = di - static_cast<int>(k) + 1, iu = di;
  const double vl = 0, vu = 0, abstol = 0;
  int found = 0, info = 0, lwork = -1, liwork = -1, iwq = 0;
  double wq = 0;
  std::vector<double> wall(d), z(static_cast<size_t>(d) * k);
  std::vector<int> isuppz(2 * static_cast<size_t>(std::max<int64_t>(k, 1)));
  const char jobz = 'V', range = 'I', uplo = 'L';
  scipy_dsyevr_(&jobz, &range, &uplo, &di, a.data(), &di, &vl, &vu, &il, &iu, &abstol, &found, wall.data(), z.data(),
                &di, isuppz.data(), &wq, &lwork, &iwq, &liwork, &info, 1, 1, 1);
  lwork = std::max(1, static_cast<int>(wq));
  liwork = std::max(1, iwq);
  std::vector<double> work(lwork);
  std::vector<int> iwork(liwork);
  scipy_dsyevr_(&jobz, &range, &uplo, &di, a.data(), &di, &vl, &vu, &il, &iu, &abstol, &found, wall.data(), z.data(),
                &di, isuppz.data(), work.data(), &lwork, iwork.data(), &liwork, &info, 1, 1, 1);
  PG_CHECK(info == 0 && found == k, "LAPACK dsyevr failed with info=", info, " (found ", found, " of ", k, ")");
  // dsyevr returns ascending order; column j of z (column-major) is an eigenvector.
  for (int64_t j = 0; j < k; ++j) {
    const int64_t src = k - 1 - j;
    w[j] = wall[src];
    // Sign convention: the largest-magnitude entry of each vector is positive (deterministic output).
    const double* col = z.data() + src * d;
    int64_t arg = 0;
    for (int64_t i = 1; i < d; ++i)
      if (std::fabs(col[i]) > std::fabs(col[arg])) arg = i;
    const double sgn = col[arg] < 0 ? -1.0 : 1.0;
    for (int64_t i = 0; i < d; ++i) v[i * k + j] = sgn * col[i];
  }
}

void matmul_cpu_f32(int m, int n, int k, const float* a, const float* b, float* c) {
  SingleThreadedBlas single(static_cast<int64_t>(m) * n * k < (int64_t{1} << 28));
  gemm<float>(false, false, m, n, k, 1.0f, a, k, b, n, 0.0f, c, n);
}

void matmul_cpu_f64(int m, int n, int k, const double* a, const double* b, double* c) {
  SingleThreadedBlas single(static_cast<int64_t>(m) * n * k < (int64_t{1} << 27));
  gemm<double>(false, false, m, n, k, 1.0, a, k, b, n, 0.0, c, n);
}

void gaussian_cpu(uint64_t seed, int64_t count, double* out) {
  // splitmix64 on a counter: sample i depends on (seed, i) only.
  auto mix = [](uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  const uint64_t key = mix(seed ^ 0x5851f42d4c957f2dULL);
  const double two_pi = 6.283185307179586476925286766559;
  for (int64_t i = 0; i < count; i += 2) {
    const uint64_t u1 = mix(key + 2 * static_cast<uint64_t>(i)), u2 = mix(key + 2 * static_cast<uint64_t>(i) + 1);
    const double a = (static_cast<double>(u1 >> 11) + 0.5) * 0x1.0p-53;  // (0, 1)
    const double b = static_cast<double>(u2 >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(a));
    out[i] = r * std::cos(two_pi * b);
    if (i + 1 < count) out[i + 1] = r * std::sin(two_pi * b);
  }
}

}  // namespace pg
