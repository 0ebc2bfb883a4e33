// CPU kernels of the gradnorm op: per-sample ‖G_bᵀ A_b‖_F² by the ghost (Gram) or the direct (tiled GEMM) form.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/blas.h"
#include "common/check.h"
#include "common/parallel.h"
#include "gradnorm.h"

namespace pg {

namespace {

// Row-major C[n,n] (upper) = op(A) op(A)ᵀ for op(A) [n, k]: A stored [n, k] (trans false) or [k, n] (trans true),
// leading dimension lda.
template <typename T>
void syrk_rows(bool trans, int n, int k, const T* a, int lda, T* c, int ldc) {
  const int tr = trans ? PgTrans : PgNoTrans;
  if constexpr (sizeof(T) == 4) {
    scipy_cblas_ssyrk(PgRowMajor, PgUpper, tr, n, k, 1.0f, a, lda, 0.0f, c, ldc);
  } else {
    scipy_cblas_dsyrk(PgRowMajor, PgUpper, tr, n, k, 1.0, a, lda, 0.0, c, ldc);
  }
}

// One sample's [rows, cols] block as BLAS sees it: `trans` false = stored row-major [rows, cols], true = stored
// row-major [cols, rows] (a transposed view, e.g. an unfolded convolution input), leading dimension `ld`.
template <typename C>
struct BlasBlock {
  const C* ptr;
  int ld;
  bool trans;
};

// A pointer into the input when its layout allows (compute-type storage with unit stride along one of the two
// axes), else the sample packed row-major into `buf` (converted to the compute type).
template <typename Tag>
BlasBlock<typename Tag::compute> sample_for_blas(const BatchView& v, int64_t b,
                                                 std::vector<typename Tag::compute>& buf) {
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  constexpr int64_t kMaxLd = std::numeric_limits<int>::max();
  if constexpr (std::is_same_v<S, C>) {
    const S* base = v.at<S>(b, 0);
    if (v.col_stride == 1 && (v.rows == 1 || (v.row_stride >= v.cols && v.row_stride <= kMaxLd))) {
      return {base, static_cast<int>(v.rows == 1 ? std::max<int64_t>(v.cols, 1) : v.row_stride), false};
    }
    if (v.row_stride == 1 && (v.cols == 1 || (v.col_stride >= v.rows && v.col_stride <= kMaxLd))) {
      return {base, static_cast<int>(v.cols == 1 ? std::max<int64_t>(v.rows, 1) : v.col_stride), true};
    }
  }
  buf.resize(static_cast<size_t>(v.rows * v.cols));
  for (int64_t r = 0; r < v.rows; ++r) {
    const S* src = v.at<S>(b, r);
    C* dst = buf.data() + r * v.cols;
    for (int64_t j = 0; j < v.cols; ++j) dst[j] = load(Tag{}, src + j * v.col_stride);
  }
  return {buf.data(), static_cast<int>(std::max<int64_t>(v.cols, 1)), false};
}

// Σ_r Σ_c x[r, c] in float64 of a [rows, cols] row-major block with leading dimension ld, squared entries.
template <typename C>
double sum_squares(const C* x, int64_t rows, int64_t cols, int64_t ld) {
  double s = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const C* p = x + r * ld;
    for (int64_t c = 0; c < cols; ++c) s += static_cast<double>(p[c]) * static_cast<double>(p[c]);
  }
  return s;
}

// Rows of the direct form's gradient tile: about 64k elements (256 KiB in float32), so the tile stays in L2.
int64_t direct_tile_rows(int64_t d_out, int64_t d_in) {
  return std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(d_in, 1), 1, std::max<int64_t>(d_out, 1));
}

template <typename Tag>
void gradnorm_impl(const BatchView& a, const BatchView& g, GradNormMethod method, double* weight_sq, double* bias_sq) {
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  const int64_t nb = a.batch, t = a.rows, d_in = a.cols, d_out = g.cols;
  const int ti = blas_int(t, "T"), dii = blas_int(d_in, "d_in"), doi = blas_int(d_out, "d_out");
  // Work per sample in multiply-adds decides how many samples a thread needs to be worth starting.
  const double work = method == GradNormMethod::ghost
                          ? static_cast<double>(t) * static_cast<double>(t) * static_cast<double>(d_in + d_out)
                          : static_cast<double>(t) * static_cast<double>(d_in) * static_cast<double>(d_out);
  const int64_t min_per_thread = std::max<int64_t>(1, static_cast<int64_t>(double(1 << 18) / std::max(work, 1.0)));
  const int ranges = parallel_ranges(nb, min_per_thread);
  // One position, ghost form: ‖g aᵀ‖² = ‖a‖²‖g‖², no BLAS needed (a forced "direct" still builds g aᵀ by tiles).
  const bool small_t = t == 1 && method == GradNormMethod::ghost;
  SingleThreadedBlas single(ranges > 1 && !small_t);
  const int64_t tile = direct_tile_rows(d_out, d_in);
  parallel_for(nb, min_per_thread, [&](int, int64_t b0, int64_t b1) {
    std::vector<C> abuf, gbuf, ka, kg, m;
    std::vector<double> colsum;
    for (int64_t b = b0; b < b1; ++b) {
      if (bias_sq != nullptr) {
        colsum.assign(static_cast<size_t>(d_out), 0.0);
        for (int64_t r = 0; r < t; ++r) {
          const S* row = g.at<S>(b, r);
          for (int64_t j = 0; j < d_out; ++j) colsum[j] += static_cast<double>(load(Tag{}, row + j * g.col_stride));
        }
        double s = 0;
        for (double c : colsum) s += c * c;
        bias_sq[b] = s;
      }
      if (t == 0 || d_in == 0 || d_out == 0) {
        weight_sq[b] = 0;
        continue;
      }
      if (small_t) {
        double sa = 0, sg = 0;
        const S* pa = a.at<S>(b, 0);
        const S* pg = g.at<S>(b, 0);
        for (int64_t j = 0; j < d_in; ++j) {
          const double v = load(Tag{}, pa + j * a.col_stride);
          sa += v * v;
        }
        for (int64_t j = 0; j < d_out; ++j) {
          const double v = load(Tag{}, pg + j * g.col_stride);
          sg += v * v;
        }
        weight_sq[b] = sa * sg;
        continue;
      }
      const BlasBlock<C> pa = sample_for_blas<Tag>(a, b, abuf);
      const BlasBlock<C> pg = sample_for_blas<Tag>(g, b, gbuf);
      if (method == GradNormMethod::ghost) {
        ka.resize(static_cast<size_t>(t * t));
        kg.resize(static_cast<size_t>(t * t));
        syrk_rows<C>(pa.trans, ti, dii, pa.ptr, pa.ld, ka.data(), ti);
        syrk_rows<C>(pg.trans, ti, doi, pg.ptr, pg.ld, kg.data(), ti);
        double diag = 0, off = 0;
        for (int64_t i = 0; i < t; ++i) {
          const C* ra = ka.data() + i * t;
          const C* rg = kg.data() + i * t;
          diag += static_cast<double>(ra[i]) * static_cast<double>(rg[i]);
          double row = 0;
          for (int64_t j = i + 1; j < t; ++j) row += static_cast<double>(ra[j]) * static_cast<double>(rg[j]);
          off += row;
        }
        weight_sq[b] = diag + 2.0 * off;
      } else {
        m.resize(static_cast<size_t>(tile * d_in));
        double s = 0;
        for (int64_t r0 = 0; r0 < d_out; r0 += tile) {
          const int64_t nr = std::min(tile, d_out - r0);
          // M[r0:r0+nr, :] = G[:, r0:r0+nr]ᵀ A
          const C* gp = pg.trans ? pg.ptr + r0 * pg.ld : pg.ptr + r0;
          gemm<C>(!pg.trans, pa.trans, static_cast<int>(nr), dii, ti, C(1), gp, pg.ld, pa.ptr, pa.ld, C(0), m.data(),
                  dii);
          s += sum_squares(m.data(), nr, d_in, d_in);
        }
        weight_sq[b] = s;
      }
    }
  });
}

}  // namespace

void gradnorm_linear_cpu(const BatchView& a, const BatchView& g, GradNormMethod method, double* weight_sq,
                         double* bias_sq) {
  PG_CHECK(a.batch == g.batch && a.rows == g.rows, "a [B, T, d_in] and g [B, T, d_out] must agree in B and T, got a [",
           a.batch, ", ", a.rows, ", ", a.cols, "] and g [", g.batch, ", ", g.rows, ", ", g.cols, "]");
  PG_CHECK_TYPE(a.dtype == g.dtype, "a and g must have the same dtype, got ", dtype_name(a.dtype), " and ",
                dtype_name(g.dtype));
  if (a.batch == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) { gradnorm_impl<decltype(tag)>(a, g, method, weight_sq, bias_sq); });
}

}  // namespace pg
