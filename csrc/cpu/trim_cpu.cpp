// CPU kernels of the trimmed cross-entropy.
//
// Forward: rows in parallel (pg::parallel_for), per row one pass for the max and one for Σ exp(x − max), then the
// loss; float32 rows of at most kSmallClasses classes (unit class stride) are taken 8 at a time, transposed, so that
// lane i of every vector is row i. The k smallest losses of the valid rows ((loss, index) pairs: ties keep the lower
// index) are found through a histogram of the losses and std::nth_element on the one bucket holding the k-th, and
// the kept losses are added in row order (independent of the thread split, so reproducible).
// Backward: one pass per row writes (exp(x − max − log_sum) − onehot) · scale on kept rows, zeros elsewhere; there
// is no [n, C] temporary besides the gradient itself. Rows of at most kSmallClasses classes stored back to back are
// written 8 at a time as whole vectors (small_rows_grad), with the same bits as the row-by-row kernel.
// Eager gradient (float32 AVX2 rows of more than kSmallClasses): the forward pass writes each row's exp(x − max) into
// the gradient while it sums them and turns it into (softmax − onehot) · factor while the row is in L1, so that the
// logits are read and exponentiated once in all; the backward pass only scales it (or nothing, for a unit scale).
//
// float32 rows with unit class stride take an AVX2 path (a vectorised expf, sums of at most kSumBlock terms in
// float32 added in float64, the next row prefetched while the current one is exponentiated); every other layout and
// float64 use the scalar path in float64. Every row's results depend on that row only (never on its block or thread),
// so they do not change with the number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
// exp(x) for 8 floats x ≤ 88 (the callers pass x − max ≤ 0): Cody–Waite reduction by ln 2, a degree-7 polynomial
// (Cephes' expf coefficients) and the power of two built in the exponent field, < 1 ulp. round(x·log2 e) comes from
// adding 1.5·2^23 + 127 (whose float ulp is 1), which leaves n + 127 in the low mantissa bits. Below −88 the input
// is clamped so that n = −127, whose exponent field is 0: the result is 0 (the true values there are < 2^-126),
// −inf included. A NaN propagates (max returns its second operand for a NaN, and NaN · anything is NaN).
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);
  const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);
  const __m256 r = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(r, magic);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(r), 23)));
}

// log(x) for 8 positive normal floats (Cephes' logf: x = 2^e · m with m in [√½, √2), a degree-9 polynomial in
// m − 1), < 1 ulp; log(1) = 0 exactly. Garbage for 0, inf and NaN: callers check those inputs themselves.
inline __m256 log256(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
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

// (max, Σ exp(x − max)) of a contiguous float32 row; with Store, exp(x − max) is also written to e[0, c). The next
// row's logits (and with Store its gradient) are prefetched meanwhile, one cache line per 16 columns (null: none), so
// that its first pass does not wait on memory.
template <bool Store>
void row_stats_f32(const float* x, int64_t c, double& row_max, double& sum, float* e, const float* next_x = nullptr,
                   float* next_e = nullptr) {
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
      if (next_x) {
        __builtin_prefetch(next_x + i, 0, 3);
        if (Store) __builtin_prefetch(next_e + i, 1, 3);
      }
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
// The next row's logits and gradient are prefetched meanwhile (null: none), as in row_stats_f32.
void row_grad_f32(const float* x, float* g, int64_t c, float m, float ls, float s, const float* next_x, float* next_g) {
  const __m256 vm = _mm256_set1_ps(m), vls = _mm256_set1_ps(ls), vs = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 8 <= c; j += 8) {
    if (next_x && !(j & 8)) {  // one cache line per 16 columns
      __builtin_prefetch(next_x + j, 0, 3);
      __builtin_prefetch(next_g + j, 1, 3);
    }
    const __m256 v = exp256(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm), vls));
    _mm256_storeu_ps(g + j, _mm256_mul_ps(v, vs));
  }
  if (j < c) {
    const __m256i mask = tail_mask(c - j);
    const __m256 v = exp256(_mm256_sub_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), vm), vls));
    _mm256_maskstore_ps(g + j, mask, _mm256_mul_ps(v, vs));
  }
}

// Rows of at most kSmallClasses classes (float32, unit class stride) are processed 8 at a time: lane i of a vector
// belongs to row i, so that the max, the sum of exp and the log are vector operations over the classes, with no
// horizontal reduction and no partly filled vector per row.
constexpr int64_t kSmallClasses = 16;

// Transposes the 8×8 matrix whose rows are v[0..8).
inline void transpose8(__m256* v) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  v[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  v[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  v[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  v[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  v[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  v[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Max, Σ exp(x − max) (added over the classes in order, in float32) and the logit of class target (0 where the
// target is not in [0, c)) of the 8 rows rows[0..8) of c ≤ 16 classes each (unit class stride); lane i is row i.
// Every lane's results depend on its own row only.
inline void small_rows_stats(const float* const* rows, int64_t c, __m256i target, __m256& row_max, __m256& sum,
                             __m256& target_logit) {
  __m256 col[kSmallClasses];
  if (c >= 8) {
    for (int i = 0; i < 8; ++i) col[i] = _mm256_loadu_ps(rows[i]);
  } else {
    const __m256i mask = tail_mask(c);
    for (int i = 0; i < 8; ++i) col[i] = _mm256_maskload_ps(rows[i], mask);
  }
  transpose8(col);
  if (c > 8) {
    const __m256i mask = tail_mask(c - 8);
    for (int i = 0; i < 8; ++i) col[8 + i] = _mm256_maskload_ps(rows[i] + 8, mask);
    transpose8(col + 8);
  }
  __m256 m = col[0];
  __m256 xt = _mm256_and_ps(col[0], _mm256_castsi256_ps(_mm256_cmpeq_epi32(target, _mm256_setzero_si256())));
  for (int64_t j = 1; j < c; ++j) {
    m = _mm256_max_ps(m, col[j]);
    const __m256i hit = _mm256_cmpeq_epi32(target, _mm256_set1_epi32(static_cast<int>(j)));
    xt = _mm256_blendv_ps(xt, col[j], _mm256_castsi256_ps(hit));
  }
  // A NaN lost by the max still makes its own exp, hence the sum, NaN; a +inf max makes x − max NaN.
  __m256 s = exp256(_mm256_sub_ps(col[0], m));
  for (int64_t j = 1; j < c; ++j) s = _mm256_add_ps(s, exp256(_mm256_sub_ps(col[j], m)));
  row_max = m;
  sum = s;
  target_logit = xt;
}

// Lanes of v that are neither NaN nor ±inf, as a movemask.
inline int finite_lanes(__m256 v) {
  return _mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_EQ_OQ));
}

// Where the lanes of the flat gradient kernel below come from: 8 consecutive rows of c ≤ 16 classes stored flat
// (row r at r·c) are c vectors of 8, lane l of vector q being class (8q + l) mod c of row (8q + l) div c.
struct FlatLanes {
  __m256i row[kSmallClasses];
  __m256i col[kSmallClasses];
  explicit FlatLanes(int64_t c) {
    for (int64_t q = 0; q < c; ++q) {
      alignas(32) int32_t r[8], j[8];
      for (int l = 0; l < 8; ++l) {
        r[l] = static_cast<int32_t>((8 * q + l) / c);
        j[l] = static_cast<int32_t>((8 * q + l) % c);
      }
      row[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(r));
      col[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(j));
    }
  }
};

// g = (exp((x − max) − log_sum) · s − [class == target]· s) on 8 flat rows (see FlatLanes), 0 on the rows whose
// keep lane is 0. Per element the same float32 operations as row_grad_f32 followed by g[t] −= s: identical bits.
inline void small_rows_grad(const float* x, float* g, int64_t c, const FlatLanes& lanes, __m256 row_max, __m256 log_sum,
                            __m256 scale, __m256i target, __m256 keep) {
  for (int64_t q = 0; q < c; ++q) {
    const __m256i idx = lanes.row[q];
    const __m256 v = _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + 8 * q), _mm256_permutevar8x32_ps(row_max, idx)),
                                   _mm256_permutevar8x32_ps(log_sum, idx));
    const __m256 s = _mm256_permutevar8x32_ps(scale, idx);
    const __m256 onehot =
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(lanes.col[q], _mm256_permutevar8x32_epi32(target, idx)));
    const __m256 e = _mm256_sub_ps(_mm256_mul_ps(exp256(v), s), _mm256_and_ps(onehot, s));
    _mm256_storeu_ps(g + 8 * q, _mm256_and_ps(e, _mm256_permutevar8x32_ps(keep, idx)));
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

// Rows taken 8 at a time by the forward pass (small_rows_stats).
inline bool small_rows(const LogitsView& v) {
#if defined(PG_TRIM_AVX2)
  return fast_rows(v) && v.classes <= kSmallClasses;
#else
  (void)v;
  return false;
#endif
}

// The eager gradient (written by the forward pass) exists for the AVX2 rows of more than kSmallClasses only, into a
// gradient of the same shape with unit class stride.
inline bool eager_rows(const LogitsView& x, const LogitsView& g) {
  return fast_rows(x) && !small_rows(x) && g.dtype == DType::float32 && g.stride_c == 1 && g.batch == x.batch &&
         g.classes == x.classes && g.positions == x.positions;
}

void check_view(const LogitsView& v, const char* name) {
  PG_CHECK(v.batch >= 0 && v.classes >= 1 && v.positions >= 1, name, " must have at least one class, got shape [",
           v.batch, ", ", v.classes, ", ", v.positions, "]");
  PG_CHECK_TYPE(v.dtype == DType::float32 || v.dtype == DType::float64, name,
                " must be float32 or float64 on the CPU, got ", dtype_name(v.dtype));
}

// Rows r stored at r · classes (unit class stride, no gap between rows or positions).
inline bool flat_rows(const LogitsView& v) {
  if (v.stride_c != 1) return false;
  if (v.positions == 1) return v.batch <= 1 || v.stride_b == v.classes;
  return v.stride_p == v.classes && (v.batch <= 1 || v.stride_b == v.classes * v.positions);
}

// Order-preserving map of a double (not NaN; −0 must have been turned into +0) to an unsigned integer.
inline uint64_t order_key(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  return (b >> 63) ? ~b : (b | (uint64_t{1} << 63));
}

// A monotone bucket of a loss for the histogram of select_smallest: the top kBucketBits of the order key of its
// float32 rounding (rounding is monotone), i.e. 2^(kBucketBits − 9) buckets per octave.
constexpr int kBucketBits = 14;
inline uint32_t loss_bucket(double v) {
  const float f = static_cast<float>(v);
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  b = (b >> 31) ? ~b : (b | 0x80000000u);
  return b >> (32 - kBucketBits);
}

// Sets keep[r] for the k smallest (loss, r) pairs among the valid rows (lexicographic: equal losses keep the lower
// row), 0 elsewhere; 1 ≤ k < number of valid rows, losses not NaN. A histogram of loss_bucket finds the bucket of
// the k-th smallest, which only its own rows have to be ranked in.
void select_smallest(const int64_t* target, int64_t ignore_index, int64_t n, int64_t k, const double* loss,
                     uint8_t* keep) {
  std::vector<uint32_t> hist(size_t{1} << kBucketBits, 0);
  for (int64_t r = 0; r < n; ++r)
    if (target[r] != ignore_index) ++hist[loss_bucket(loss[r] + 0.0)];  // + 0.0: −0 → +0
  uint32_t kb = 0;
  int64_t below = 0;
  while (below + hist[kb] < k) below += hist[kb++];
  // Rows below bucket kb are kept, rows above dropped, rows in it ranked.
  std::vector<std::pair<uint64_t, int64_t>> ranked;
  ranked.reserve(hist[kb]);
  for (int64_t r = 0; r < n; ++r) {
    const double v = loss[r] + 0.0;
    const uint32_t b = loss_bucket(v);
    const bool valid = target[r] != ignore_index;
    keep[r] = valid && b < kb;
    if (valid && b == kb) ranked.emplace_back(order_key(v), r);
  }
  const auto kth = ranked.begin() + (k - below - 1);
  std::nth_element(ranked.begin(), kth, ranked.end());
  for (auto it = ranked.begin(); it <= kth; ++it) keep[it->second] = 1;
}

}  // namespace

double trimmed_cross_entropy_forward_cpu(const LogitsView& logits, const int64_t* target, int64_t ignore_index,
                                         int64_t k, TrimRows rows, const LogitsView* eager_grad, double eager_factor) {
  check_view(logits, "logits");
  const int64_t n = logits.rows();
  const int64_t c = logits.classes;
  const bool fast = fast_rows(logits);
  const bool eager = eager_grad != nullptr && eager_rows(logits, *eager_grad);
  (void)eager_factor;  // used by the AVX2 rows only
  // Targets first (cheap, and nothing is written when one is wrong).
  int64_t n_valid = 0, n_bad = 0;
  for (int64_t r = 0; r < n; ++r) {  // branch-free (vectorised); the bad row is looked for only when there is one
    const int64_t t = target[r];
    const bool valid = t != ignore_index;
    n_valid += valid;
    n_bad += valid & (static_cast<uint64_t>(t) >= static_cast<uint64_t>(c));
  }
  for (int64_t r = 0; n_bad && r < n; ++r) {
    const int64_t t = target[r];
    PG_CHECK(t == ignore_index || (t >= 0 && t < c), "target must be in [0, ", c, ") or ignore_index (", ignore_index,
             "), got ", t, " at row ", r);
  }
  PG_CHECK(k >= std::min<int64_t>(1, n_valid) && k <= n_valid, "k must be in [", std::min<int64_t>(1, n_valid), ", ",
           n_valid, "] for ", n_valid, " valid rows, got ", k);

  // Writes row r's results from its max, Σ exp(x − max) (checked here) and log of that sum.
  auto finish_row = [&](int64_t r, double m, double s, double ls, double xt) {
    PG_CHECK(std::isfinite(m) && std::isfinite(s), "logits row ", r, " holds NaN or +inf, or no finite value ",
             "(its log-sum-exp is not finite)");
    rows.row_max[r] = m;
    rows.log_sum[r] = ls;
    rows.loss[r] = (m - xt) + ls;  // +inf when the target's logit is -inf
  };
  auto ignored_row = [&](int64_t r) {
    rows.keep[r] = 0;
    if (target[r] != ignore_index) return false;
    rows.loss[r] = rows.row_max[r] = rows.log_sum[r] = 0.0;
    return true;
  };
#if defined(PG_TRIM_AVX2)
  if (small_rows(logits)) {
    // 8 rows at a time (the last block padded with rows of zeros): a row's results do not depend on its block.
    const float zeros[kSmallClasses] = {};
    const float* base = static_cast<const float*>(logits.data);
    parallel_for((n + 7) / 8, std::max<int64_t>(1, min_rows_per_thread(c) / 8), [&](int, int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        const int64_t r0 = blk * 8;
        const int lanes = static_cast<int>(std::min<int64_t>(8, n - r0));
        const float* ptr[8];
        alignas(32) int32_t t32[8];
        for (int i = 0; i < 8; ++i) {
          ptr[i] = i < lanes ? base + logits.row_offset(r0 + i) : zeros;
          // Any target outside [0, c) selects no logit (ignored rows, whose results are zeros anyway).
          const int64_t t = i < lanes ? target[r0 + i] : -1;
          t32[i] = t >= 0 && t < c ? static_cast<int32_t>(t) : -1;
        }
        __m256 vm, vs, vt;
        small_rows_stats(ptr, c, _mm256_load_si256(reinterpret_cast<const __m256i*>(t32)), vm, vs, vt);
        const __m256 vl = log256(vs);  // the sum is ≥ 1 where it is finite
        if (lanes < 8) {               // the same operations, one row at a time
          alignas(32) float fm[8], fs[8], fl[8], ft[8];
          _mm256_store_ps(fm, vm);
          _mm256_store_ps(fs, vs);
          _mm256_store_ps(fl, vl);
          _mm256_store_ps(ft, vt);
          for (int i = 0; i < lanes; ++i)
            if (!ignored_row(r0 + i)) finish_row(r0 + i, fm[i], fs[i], fl[i], ft[i]);
          continue;
        }
        // loss = (max − x[target]) + log_sum in float64, zeros on ignored rows; keep = 0.
        const __m256i ii = _mm256_set1_epi64x(ignore_index);
        const __m256d ign_lo = _mm256_castsi256_pd(
            _mm256_cmpeq_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(target + r0)), ii));
        const __m256d ign_hi = _mm256_castsi256_pd(
            _mm256_cmpeq_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(target + r0 + 4)), ii));
        const int valid = ~(_mm256_movemask_pd(ign_lo) | (_mm256_movemask_pd(ign_hi) << 4)) & 0xff;
        const int bad = valid & ~(finite_lanes(vm) & finite_lanes(vs));
        if (bad) {
          const int i = __builtin_ctz(static_cast<unsigned>(bad));
          finish_row(r0 + i, std::numeric_limits<double>::quiet_NaN(), 0.0, 0.0, 0.0);  // throws
        }
        auto store = [&](double* out, __m256d lo, __m256d hi) {
          _mm256_storeu_pd(out + r0, _mm256_andnot_pd(ign_lo, lo));
          _mm256_storeu_pd(out + r0 + 4, _mm256_andnot_pd(ign_hi, hi));
        };
        const __m256d m_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(vm)),
                      m_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(vm, 1));
        const __m256d l_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(vl)),
                      l_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(vl, 1));
        const __m256d t_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(vt)),
                      t_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(vt, 1));
        store(rows.row_max, m_lo, m_hi);
        store(rows.log_sum, l_lo, l_hi);
        store(rows.loss, _mm256_add_pd(_mm256_sub_pd(m_lo, t_lo), l_lo),
              _mm256_add_pd(_mm256_sub_pd(m_hi, t_hi), l_hi));
        std::memset(rows.keep + r0, 0, 8);
      }
    });
  } else
#endif
  {
    parallel_for(n, min_rows_per_thread(c), [&](int, int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        float* g =
            eager ? static_cast<float*>(const_cast<void*>(eager_grad->data)) + eager_grad->row_offset(r) : nullptr;
        if (ignored_row(r)) {
          if (eager) std::fill(g, g + c, 0.0f);
          continue;
        }
        const int64_t t = target[r];
        const int64_t off = logits.row_offset(r);
        double m = 0.0, s = 0.0, xt = 0.0;
        if (fast) {
#if defined(PG_TRIM_AVX2)
          const float* x = static_cast<const float*>(logits.data) + off;
          if (eager) {
            const bool next = r + 1 < e;
            row_stats_f32<true>(
                x, c, m, s, g,  // g = exp(x − max)
                next ? static_cast<const float*>(logits.data) + logits.row_offset(r + 1) : nullptr,
                next ? static_cast<float*>(const_cast<void*>(eager_grad->data)) + eager_grad->row_offset(r + 1)
                     : nullptr);
            finish_row(r, m, s, std::log(s), x[t]);
            // (softmax − onehot) · factor while the row is still in L1: softmax = exp(x − max) / Σ.
            const float mult = static_cast<float>(eager_factor / s);
            for (int64_t j = 0; j < c; ++j) g[j] *= mult;
            g[t] -= static_cast<float>(eager_factor);
            continue;
          }
          row_stats_f32<false>(x, c, m, s, nullptr,
                               r + 1 < e ? static_cast<const float*>(logits.data) + logits.row_offset(r + 1) : nullptr);
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
        finish_row(r, m, s, std::log(s), xt);
      }
    });
  }

  if (n_valid == 0) return 0.0;
  if (k == n_valid) {
    for (int64_t r = 0; r < n; ++r) rows.keep[r] = target[r] != ignore_index;
  } else {
    select_smallest(target, ignore_index, n, k, rows.loss, rows.keep);
    if (eager)  // the dropped rows' gradient is 0
      parallel_for(n, min_rows_per_thread(c), [&](int, int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          if (!rows.keep[r] && target[r] != ignore_index) {
            float* g = static_cast<float*>(const_cast<void*>(eager_grad->data)) + eager_grad->row_offset(r);
            std::fill(g, g + c, 0.0f);
          }
      });
  }
  // Eight partial sums (row r into sum r mod 8, then added in order): a fixed order, whatever the threads.
  double part[8] = {};
  int64_t r = 0;
  for (; r + 8 <= n; r += 8)
    for (int j = 0; j < 8; ++j) part[j] += rows.keep[r + j] ? rows.loss[r + j] : 0.0;
  for (; r < n; ++r) part[r & 7] += rows.keep[r] ? rows.loss[r] : 0.0;
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
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
  auto row = [&](int64_t r, bool prefetch_next) {
    (void)prefetch_next;  // AVX2 rows only
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
      return;
    }
    const int64_t off = logits.row_offset(r);
    const int64_t t = target[r];
    const double s = factor * scale[r * scale_stride];
    const double m = rows.row_max[r], ls = rows.log_sum[r];
    if (fast) {
#if defined(PG_TRIM_AVX2)
      const float* x = static_cast<const float*>(logits.data) + off;
      float* g = static_cast<float*>(const_cast<void*>(grad.data)) + goff;
      const bool next = prefetch_next && rows.keep[r + 1];
      row_grad_f32(x, g, c, static_cast<float>(m), static_cast<float>(ls), static_cast<float>(s),
                   next ? static_cast<const float*>(logits.data) + logits.row_offset(r + 1) : nullptr,
                   next ? static_cast<float*>(const_cast<void*>(grad.data)) + grad.row_offset(r + 1) : nullptr);
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
  };
#if defined(PG_TRIM_AVX2)
  if (fast && c <= kSmallClasses && flat_rows(logits) && flat_rows(grad)) {
    // Blocks of 8 flat rows (small_rows_grad), the last partial block row by row: the same bits either way.
    const FlatLanes lanes(c);
    const float* x = static_cast<const float*>(logits.data);
    float* g = static_cast<float*>(const_cast<void*>(grad.data));
    parallel_for((n + 7) / 8, std::max<int64_t>(1, min_rows_per_thread(c) / 8), [&](int, int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        const int64_t r0 = blk * 8;
        if (r0 + 8 > n) {
          for (int64_t r = r0; r < n; ++r) row(r, false);
          continue;
        }
        alignas(32) float fm[8], fl[8], fs[8], fk[8];
        alignas(32) int32_t ft[8];
        for (int i = 0; i < 8; ++i) {
          const int64_t r = r0 + i;
          const bool kept = rows.keep[r] != 0;
          fm[i] = static_cast<float>(rows.row_max[r]);
          fl[i] = static_cast<float>(rows.log_sum[r]);
          fs[i] = kept ? static_cast<float>(factor * scale[r * scale_stride]) : 0.0f;
          ft[i] = kept ? static_cast<int32_t>(target[r]) : -1;
          int32_t all = kept ? -1 : 0;
          std::memcpy(&fk[i], &all, sizeof all);
        }
        small_rows_grad(x + r0 * c, g + r0 * c, c, lanes, _mm256_load_ps(fm), _mm256_load_ps(fl), _mm256_load_ps(fs),
                        _mm256_load_si256(reinterpret_cast<const __m256i*>(ft)), _mm256_load_ps(fk));
      }
    });
    return;
  }
#endif
  parallel_for(n, min_rows_per_thread(c), [&](int, int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) row(r, r + 1 < e);
  });
}

bool trimmed_cross_entropy_eager_available(const LogitsView& logits, const LogitsView& grad) {
  return eager_rows(logits, grad);
}

void trimmed_cross_entropy_backward_eager_cpu(const TrimRows& rows, const double* scale, int64_t scale_stride,
                                              double factor, const LogitsView& grad) {
  PG_CHECK_TYPE(grad.dtype == DType::float32 && grad.stride_c == 1,
                "the eager gradient must be float32 with unit class stride");
  if (scale_stride == 0 && factor * scale[0] == 1.0) return;  // the usual case: the gradient is final
  const int64_t n = grad.rows();
  const int64_t c = grad.classes;
  parallel_for(n, min_rows_per_thread(c), [&](int, int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      if (!rows.keep[r]) continue;  // zeros already
      float* g = static_cast<float*>(const_cast<void*>(grad.data)) + grad.row_offset(r);
      const float mult = static_cast<float>(factor * scale[r * scale_stride]);
      for (int64_t j = 0; j < c; ++j) g[j] *= mult;
    }
  });
}

}  // namespace pg
