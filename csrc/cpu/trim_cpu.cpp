// CPU kernels of the trimmed cross-entropy.
//
// Forward: rows in parallel (pg::parallel_for), per row one pass for the max and one for Σ exp(x − max), then the
// loss; the k smallest losses of the valid rows by std::nth_element on (loss, index) pairs (ties: lower index
// first), and the kept losses added in row order (independent of the thread split, so reproducible).
// Backward: one pass per row writes (exp(x − max − log_sum) − onehot) · scale on kept rows, zeros elsewhere; there
// is no [n, C] temporary besides the gradient itself.
//
// float32 rows with unit class stride take an AVX2 path (a vectorised expf, sums of at most kSumBlock terms in
// float32 added in float64); every other layout and float64 use the scalar path in float64.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "common/check.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "trim.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PG_TRIM_AVX2 1
#endif

namespace pg {

namespace {

// Rows per thread at least: a thread's share should be ~64k elements so that starting it pays.
int64_t min_rows_per_thread(int64_t classes) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(classes, 1));
}

// float32 partial sums of Σ exp run over at most this many columns before they are added in float64.
constexpr int64_t kSumBlock = 512;

#if defined(PG_TRIM_AVX2)
// exp(x) for 8 floats: Cody–Waite reduction by ln 2 and a degree-6 polynomial (Cephes' expf coefficients,
// ~1 ulp); 0 below −87.3 (where float32 results would be subnormal), NaN propagates.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447505531f);
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));  // a NaN x is returned by both (second operand)
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_cvtps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(n));
  return _mm256_andnot_ps(underflow, y);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline double hsum_d(__m256 v) {
  const __m256d a =
      _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}

// Lanes [0, n) of a tail (n < 8) load/store.
inline __m256i tail_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}

// (max, Σ exp(x − max)) of a contiguous float32 row; with Store, exp(x − max) is also written to e[0, c).
template <bool Store>
void row_stats_f32(const float* x, int64_t c, double& row_max, double& sum, float* e) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = neg_inf, m1 = neg_inf;
  int64_t j = 0;
  for (; j + 16 <= c; j += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + j + 8));
  }
  for (; j + 8 <= c; j += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
  float m = hmax(_mm256_max_ps(m0, m1));
  for (; j < c; ++j) m = std::max(m, x[j]);
  // A NaN anywhere makes the sum NaN below (x − m is NaN), which the caller reports.
  const __m256 vm = _mm256_set1_ps(m);
  double total = 0.0;
  for (int64_t b = 0; b < c; b += kSumBlock) {
    const int64_t end = std::min(c, b + kSumBlock);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = b;
    for (; i + 16 <= end; i += 16) {
      const __m256 v0 = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
      const __m256 v1 = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm));
      if (Store) {
        _mm256_storeu_ps(e + i, v0);
        _mm256_storeu_ps(e + i + 8, v1);
      }
      s0 = _mm256_add_ps(s0, v0);
      s1 = _mm256_add_ps(s1, v1);
    }
    for (; i + 8 <= end; i += 8) {
      const __m256 v = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
      if (Store) _mm256_storeu_ps(e + i, v);
      s0 = _mm256_add_ps(s0, v);
    }
    if (i < end) {
      const __m256i mask = tail_mask(end - i);
      const __m256 v = exp256(_mm256_sub_ps(_mm256_maskload_ps(x + i, mask), vm));
      if (Store) _mm256_maskstore_ps(e + i, mask, v);
      s1 = _mm256_add_ps(s1, _mm256_and_ps(v, _mm256_castsi256_ps(mask)));
    }
    total += hsum_d(_mm256_add_ps(s0, s1));
  }
  row_max = m;
  sum = total;
}

// g[j] = exp((x[j] − m) − ls) · s for a contiguous float32 row (the one-hot is subtracted by the caller).
void row_grad_f32(const float* x, float* g, int64_t c, float m, float ls, float s) {
  const __m256 vm = _mm256_set1_ps(m), vls = _mm256_set1_ps(ls), vs = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 8 <= c; j += 8) {
    const __m256 v = exp256(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), vls));
    _mm256_storeu_ps(g + j, _mm256_mul_ps(v, vs));
  }
  if (j < c) {
    const __m256i mask = tail_mask(c - j);
    const __m256 v = exp256(_mm256_sub_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), vm), vls));
    _mm256_maskstore_ps(g + j, mask, _mm256_mul_ps(v, vs));
  }
}
#endif  // PG_TRIM_AVX2

// Scalar row statistics in float64, any class stride.
template <typename Tag>
void row_stats_scalar(const typename Tag::storage* x, int64_t c, int64_t sc, double& row_max, double& sum) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < c; ++j) {
    const double v = static_cast<double>(load(Tag{}, x + j * sc));
    m = v > m ? v : m;
  }
  double s = 0.0;
  for (int64_t j = 0; j < c; ++j) s += std::exp(static_cast<double>(load(Tag{}, x + j * sc)) - m);
  row_max = m;
  sum = s;
}

inline bool fast_rows(const LogitsView& v) {
#if defined(PG_TRIM_AVX2)
  return v.dtype == DType::float32 && v.stride_c == 1;
#else
  (void)v;
  return false;
#endif
}

// The eager gradient (exp written in the forward pass) exists for the AVX2 rows only, into a gradient of the same
// shape with unit class stride.
inline bool eager_rows(const LogitsView& x, const LogitsView& g) {
  return fast_rows(x) && g.dtype == DType::float32 && g.stride_c == 1 && g.batch == x.batch && g.classes == x.classes &&
         g.positions == x.positions;
}

void check_view(const LogitsView& v, const char* name) {
  PG_CHECK(v.batch >= 0 && v.classes >= 1 && v.positions >= 1, name, " must have at least one class, got shape [",
           v.batch, ", ", v.classes, ", ", v.positions, "]");
  PG_CHECK_TYPE(v.dtype == DType::float32 || v.dtype == DType::float64, name,
                " must be float32 or float64 on the CPU, got ", dtype_name(v.dtype));
}

}  // namespace

double trimmed_cross_entropy_forward_cpu(const LogitsView& logits, const int64_t* target, int64_t ignore_index,
                                         int64_t k, TrimRows rows, const LogitsView* eager_grad) {
  check_view(logits, "logits");
  const int64_t n = logits.rows();
  const int64_t c = logits.classes;
  const bool fast = fast_rows(logits);
  const bool eager = eager_grad != nullptr && eager_rows(logits, *eager_grad);
  // Targets first (cheap, and nothing is written when one is wrong).
  int64_t n_valid = 0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t t = target[r];
    if (t == ignore_index) continue;
    PG_CHECK(t >= 0 && t < c, "target must be in [0, ", c, ") or ignore_index (", ignore_index, "), got ", t,
             " at row ", r);
    ++n_valid;
  }
  PG_CHECK(k >= std::min<int64_t>(1, n_valid) && k <= n_valid, "k must be in [", std::min<int64_t>(1, n_valid), ", ",
           n_valid, "] for ", n_valid, " valid rows, got ", k);

  parallel_for(n, min_rows_per_thread(c), [&](int, int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t t = target[r];
      rows.keep[r] = 0;
      if (t == ignore_index) {
        rows.loss[r] = rows.row_max[r] = rows.log_sum[r] = 0.0;
        continue;
      }
      const int64_t off = logits.row_offset(r);
      double m = 0.0, s = 0.0, xt = 0.0;
      if (fast) {
#if defined(PG_TRIM_AVX2)
        const float* x = static_cast<const float*>(logits.data) + off;
        if (eager)
          row_stats_f32<true>(x, c, m, s,
                              static_cast<float*>(const_cast<void*>(eager_grad->data)) + eager_grad->row_offset(r));
        else
          row_stats_f32<false>(x, c, m, s, nullptr);
        xt = x[t];
#endif
      } else if (logits.dtype == DType::float64) {
        const double* x = static_cast<const double*>(logits.data) + off;
        row_stats_scalar<f64_tag>(x, c, logits.stride_c, m, s);
        xt = x[t * logits.stride_c];
      } else {
        const float* x = static_cast<const float*>(logits.data) + off;
        row_stats_scalar<f32_tag>(x, c, logits.stride_c, m, s);
        xt = x[t * logits.stride_c];
      }
      PG_CHECK(std::isfinite(m) && std::isfinite(s), "logits row ", r, " holds NaN or +inf, or no finite value ",
               "(its log-sum-exp is not finite)");
      const double ls = std::log(s);
      rows.row_max[r] = m;
      rows.log_sum[r] = ls;
      rows.loss[r] = (m - xt) + ls;  // +inf when the target's logit is -inf
    }
  });

  if (n_valid == 0) return 0.0;
  if (k == n_valid) {
    for (int64_t r = 0; r < n; ++r) rows.keep[r] = target[r] != ignore_index;
  } else {
    std::vector<std::pair<double, int64_t>> order;
    order.reserve(static_cast<size_t>(n_valid));
    for (int64_t r = 0; r < n; ++r)
      if (target[r] != ignore_index) order.emplace_back(rows.loss[r], r);
    // Lexicographic (loss, index): equal losses keep the lower index. Losses are never NaN here.
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end());
    const std::pair<double, int64_t> kth = order[static_cast<size_t>(k - 1)];
    for (const auto& p : order) rows.keep[p.second] = p <= kth;
  }
  double total = 0.0;
  for (int64_t r = 0; r < n; ++r)
    if (rows.keep[r]) total += rows.loss[r];
  return total;
}

void trimmed_cross_entropy_backward_cpu(const LogitsView& logits, const int64_t* target, const TrimRows& rows,
                                        const double* scale, int64_t scale_stride, double factor,
                                        const LogitsView& grad) {
  check_view(logits, "logits");
  PG_CHECK(grad.batch == logits.batch && grad.classes == logits.classes && grad.positions == logits.positions,
           "grad must have the logits' shape");
  PG_CHECK_TYPE(grad.dtype == logits.dtype, "grad must have the logits' dtype ", dtype_name(logits.dtype));
  const int64_t n = logits.rows();
  const int64_t c = logits.classes;
  const bool fast = fast_rows(logits) && grad.stride_c == 1;
  const bool f64 = logits.dtype == DType::float64;
  parallel_for(n, min_rows_per_thread(c), [&](int, int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t goff = grad.row_offset(r);
      const int64_t gs = grad.stride_c;
      if (!rows.keep[r]) {
        if (f64) {
          double* g = static_cast<double*>(const_cast<void*>(grad.data)) + goff;
          for (int64_t j = 0; j < c; ++j) g[j * gs] = 0.0;
        } else {
          float* g = static_cast<float*>(const_cast<void*>(grad.data)) + goff;
          for (int64_t j = 0; j < c; ++j) g[j * gs] = 0.0f;
        }
        continue;
      }
      const int64_t off = logits.row_offset(r);
      const int64_t t = target[r];
      const double s = factor * scale[r * scale_stride];
      const double m = rows.row_max[r], ls = rows.log_sum[r];
      if (fast) {
#if defined(PG_TRIM_AVX2)
        const float* x = static_cast<const float*>(logits.data) + off;
        float* g = static_cast<float*>(const_cast<void*>(grad.data)) + goff;
        row_grad_f32(x, g, c, static_cast<float>(m), static_cast<float>(ls), static_cast<float>(s));
        g[t] -= static_cast<float>(s);
#endif
      } else if (f64) {
        const double* x = static_cast<const double*>(logits.data) + off;
        double* g = static_cast<double*>(const_cast<void*>(grad.data)) + goff;
        const int64_t sc = logits.stride_c;
        for (int64_t j = 0; j < c; ++j) g[j * gs] = std::exp((x[j * sc] - m) - ls) * s;
        g[t * gs] -= s;
      } else {
        const float* x = static_cast<const float*>(logits.data) + off;
        float* g = static_cast<float*>(const_cast<void*>(grad.data)) + goff;
        const int64_t sc = logits.stride_c;
        for (int64_t j = 0; j < c; ++j) g[j * gs] = static_cast<float>(std::exp((x[j * sc] - m) - ls) * s);
        g[t * gs] -= static_cast<float>(s);
      }
    }
  });
}

bool trimmed_cross_entropy_eager_available(const LogitsView& logits, const LogitsView& grad) {
  return eager_rows(logits, grad);
}

void trimmed_cross_entropy_backward_eager_cpu(const int64_t* target, const TrimRows& rows, const double* scale,
                                              int64_t scale_stride, double factor, const LogitsView& grad) {
  PG_CHECK_TYPE(grad.dtype == DType::float32 && grad.stride_c == 1,
                "the eager gradient must be float32 with unit class stride");
  const int64_t n = grad.rows();
  const int64_t c = grad.classes;
  parallel_for(n, min_rows_per_thread(c), [&](int, int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* g = static_cast<float*>(const_cast<void*>(grad.data)) + grad.row_offset(r);
      if (!rows.keep[r]) {
        std::fill(g, g + c, 0.0f);
        continue;
      }
      // g holds exp(x − max); softmax = that / Σ = that · exp(−log_sum).
      const double s = factor * scale[r * scale_stride];
      const float mult = static_cast<float>(s * std::exp(-rows.log_sum[r]));
      for (int64_t j = 0; j < c; ++j) g[j] *= mult;
      g[target[r]] -= static_cast<float>(s);
    }
  });
}

}  // namespace pg
