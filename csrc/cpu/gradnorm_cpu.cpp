// CPU kernels of the gradnorm op: per-sample ‖G_bᵀ A_b‖_F² by the ghost (Gram) or the direct (tiled GEMM) form.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/blas.h"
#include "common/check.h"
#include "common/parallel.h"
#include "common/sqgemm.h"
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
// Eight float64 partial sums (a single running sum would bound the loop by the add latency), added in a fixed order.
template <typename C>
double sum_squares(const C* x, int64_t rows, int64_t cols, int64_t ld) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t r = 0; r < rows; ++r) {
    const C* p = x + r * ld;
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      for (int k = 0; k < 8; ++k) acc[k] += static_cast<double>(p[c + k]) * static_cast<double>(p[c + k]);
    }
    for (; c < cols; ++c) acc[c & 7] += static_cast<double>(p[c]) * static_cast<double>(p[c]);
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// Rows of the direct form's gradient tile: about 64k elements (256 KiB in float32), so the tile stays in L2.
int64_t direct_tile_rows(int64_t d_out, int64_t d_in) {
  return std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(d_in, 1), 1, std::max<int64_t>(d_out, 1));
}

// Σ v² over n elements at the given stride, in float64, in eight partial sums as sum_squares.
template <typename Tag>
double strided_sum_squares(const typename Tag::storage* p, int64_t n, int64_t stride) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int c = 0; c < 8; ++c) {
      const double v = load(Tag{}, p + (j + c) * stride);
      acc[c] += v * v;
    }
  }
  for (; j < n; ++j) {
    const double v = load(Tag{}, p + j * stride);
    acc[j & 7] += v * v;
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
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
        weight_sq[b] = strided_sum_squares<Tag>(a.at<S>(b, 0), d_in, a.col_stride) *
                       strided_sum_squares<Tag>(g.at<S>(b, 0), d_out, g.col_stride);
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

// ‖Σ_t g_t‖² of sample b of g [B, T, d_out] (float64 sums).
template <typename Tag>
double bias_sqnorm(const BatchView& g, int64_t b, std::vector<double>& colsum) {
  using S = typename Tag::storage;
  colsum.assign(static_cast<size_t>(g.cols), 0.0);
  if (g.row_stride == 1 && g.cols > 1) {  // channel-major (a convolution's gradient): each column is contiguous
    for (int64_t j = 0; j < g.cols; ++j) {
      const S* col = g.at<S>(b, 0) + j * g.col_stride;
      double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t r = 0;
      for (; r + 8 <= g.rows; r += 8) {
        for (int k = 0; k < 8; ++k) acc[k] += static_cast<double>(load(Tag{}, col + r + k));
      }
      for (; r < g.rows; ++r) acc[r & 7] += static_cast<double>(load(Tag{}, col + r));
      colsum[j] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
  } else {
    for (int64_t r = 0; r < g.rows; ++r) {
      const S* row = g.at<S>(b, r);
      for (int64_t j = 0; j < g.cols; ++j) colsum[j] += static_cast<double>(load(Tag{}, row + j * g.col_stride));
    }
  }
  double s = 0;
  for (double c : colsum) s += c * c;
  return s;
}

// Columns [c0, c0 + n) of a sample block [rows, cols] (a group of output channels).
template <typename C>
BlasBlock<C> block_columns(const BlasBlock<C>& p, int64_t c0) {
  return {p.trans ? p.ptr + c0 * p.ld : p.ptr + c0, p.ld, p.trans};
}

// One sample block of the book-keeping form: M = Gᵀ A [d_out, d_in] by tiles of `tile` rows into `m`; returns Σ M²
// (float64) and adds M into acc [d_out, d_in] (leading dimension ld_acc).
template <typename C>
double direct_block_accumulate(const BlasBlock<C>& pa, const BlasBlock<C>& pg, int t, int d_in, int64_t d_out,
                               int64_t tile, std::vector<C>& m, C* acc, int64_t ld_acc) {
  m.resize(static_cast<size_t>(tile * d_in));
  double s = 0;
  for (int64_t r0 = 0; r0 < d_out; r0 += tile) {
    const int64_t nr = std::min(tile, d_out - r0);
    const C* gp = pg.trans ? pg.ptr + r0 * pg.ld : pg.ptr + r0;
    gemm<C>(!pg.trans, pa.trans, static_cast<int>(nr), d_in, t, C(1), gp, pg.ld, pa.ptr, pa.ld, C(0), m.data(), d_in);
    for (int64_t r = 0; r < nr; ++r) {
      const C* src = m.data() + r * d_in;
      C* dst = acc + (r0 + r) * ld_acc;
      // a row's squares in kLanes partial sums of the compute type (so the loop vectorises), rows summed in float64
      constexpr int64_t kLanes = 16;
      C part[kLanes] = {};
      int64_t c = 0;
      for (; c + kLanes <= d_in; c += kLanes) {
        for (int64_t k = 0; k < kLanes; ++k) {
          part[k] += src[c + k] * src[c + k];
          dst[c + k] += src[c + k];
        }
      }
      double row = 0;
      for (; c < d_in; ++c) {
        row += static_cast<double>(src[c]) * static_cast<double>(src[c]);
        dst[c] += src[c];
      }
      for (int64_t k = 0; k < kLanes; ++k) row += static_cast<double>(part[k]);
      s += row;
    }
  }
  return s;
}

#if defined(__AVX2__)
// The 8 × 8 block at src (rows ld_src apart) transposed into dst (rows ld_dst apart).
inline void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// dst [cols, rows] (leading dimension ld_dst) = srcᵀ for src [rows, cols] (leading dimension ld_src): 8 × 8 blocks
// in registers where AVX2 is compiled in, the edges (and other builds) element by element. `next` (or null): the
// next sample's block, same layout, fetched into L2 on the way (src comes from memory, first touched here).
void transpose_f32(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst,
                   const float* next) {
  int64_t r8 = 0, c8 = 0;
#if defined(__AVX2__)
  r8 = rows - rows % 8;
  c8 = cols - cols % 8;
  for (int64_t r = 0; r < r8; r += 8) {
    for (int64_t c = 0; c < c8; c += 8) {
      if (next != nullptr && c % 16 == 0) {
        for (int i = 0; i < 8; ++i) __builtin_prefetch(next + (r + i) * ld_src + c, 0, 2);
      }
      transpose8x8(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
    }
  }
#else
  (void)next;
#endif
  auto scalar = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = c0; c < c1; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
  };
  scalar(0, r8, c8, cols);    // right edge of the 8 × 8 blocks
  scalar(r8, rows, 0, cols);  // bottom rows (all of it without AVX2)
}

// One sample of the book-keeping form by sqgemm (float32, the kernel of `isa`): for each channel group k, Mᵀ = Aᵀ G
// [d_in, d_out] is added into accᵀ's block k and its squares summed. G [T, cols] must be row-major for the kernel's
// vector loads: a transposed block (a convolution's channel-major output gradient) is packed into vbuf first.
template <typename ABlock>
double sample_sqgemm(SqgemmIsa isa, const BlasBlock<float>& pg, const float* g_next, int64_t t, int64_t cols,
                     int64_t groups, int64_t d_in, int64_t d_out, std::vector<float>& vbuf, float* acc_t,
                     ABlock&& a_block) {
  const float* v = pg.ptr;
  int64_t ldv = pg.ld;
  if (pg.trans) {  // stored [cols, T]
    vbuf.resize(static_cast<size_t>(t * cols));
    transpose_f32(pg.ptr, pg.ld, cols, t, vbuf.data(), cols, g_next);
    v = vbuf.data();
    ldv = cols;
  }
  double s = 0;
  for (int64_t k = 0; k < groups; ++k) {
    const BlasBlock<float> pa = a_block(k);  // A [T, d_in]: stored [d_in, T] when trans
    const int64_t s_r = pa.trans ? pa.ld : 1, s_k = pa.trans ? 1 : pa.ld;
    s += sqgemm_accumulate(isa, d_in, d_out, t, pa.ptr, s_r, s_k, v + k * d_out, ldv, acc_t + k * d_in * d_out, d_out);
  }
  return s;
}

// Driver of the book-keeping form over samples: for sample b and channel group k, a_block(b, k, buf) gives A [T,
// d_in]; G is g's sample b, columns k·d_out .. (k+1)·d_out. grad_weight [groups·d_out, d_in] is the sum over samples.
template <typename Tag, typename ABlock>
void bookkeeping_impl(const BatchView& g, int64_t groups, int64_t t, int64_t d_in, int64_t d_out, double* weight_sq,
                      double* bias_sq, typename Tag::compute* grad_weight, typename Tag::compute* grad_bias,
                      ABlock&& a_block) {
  using C = typename Tag::compute;
  const int64_t nb = g.batch;
  const size_t nw = static_cast<size_t>(groups * d_out * d_in);
  std::fill(grad_weight, grad_weight + nw, C(0));
  if (grad_bias != nullptr) std::fill(grad_bias, grad_bias + g.cols, C(0));
  if (nb == 0) return;
  const int ti = blas_int(t, "T"), dii = blas_int(d_in, "d_in");
  blas_int(d_out, "d_out");
  const double work = static_cast<double>(groups) * static_cast<double>(std::max<int64_t>(t, 1)) *
                      static_cast<double>(d_in) * static_cast<double>(d_out);
  const int64_t min_per_thread = std::max<int64_t>(1, static_cast<int64_t>(double(1 << 18) / std::max(work, 1.0)));
  const int ranges = parallel_ranges(nb, min_per_thread);
  const int64_t tile = direct_tile_rows(d_out, d_in);
  // float32 on AVX-512 or AVX2: each sample's block formed, squared and summed in registers (sqgemm, by the ISA
  // in use at the call's start); it accumulates grad_weightᵀ per group [d_in, d_out] in every range, transposed and
  // added in order at the end
  const SqgemmIsa isa = std::is_same_v<C, float> ? sqgemm_isa() : SqgemmIsa::none;
  const bool fast = isa != SqgemmIsa::none;
  SingleThreadedBlas single(ranges > 1 && !fast);  // only the BLAS path calls BLAS from the ranges
  // BLAS path: range 0 accumulates into grad_weight itself, the others into their own buffers; sqgemm path: every
  // range into its own grad_weightᵀ buffer. Added in order at the end
  std::vector<std::vector<C>> partial(static_cast<size_t>(std::max(fast ? ranges : ranges - 1, 0)));
  // the bias gradient Σ_b Σ_t g_t: per range in float64 from the per-sample column sums, ranges added in order
  const bool want_bias = grad_bias != nullptr;
  std::vector<std::vector<double>> bias_part(want_bias ? static_cast<size_t>(ranges) : 0);
  parallel_for(nb, min_per_thread, [&](int r, int64_t b0, int64_t b1) {
    C* acc = grad_weight;
    if (fast || r > 0) {
      auto& p = partial[fast ? r : r - 1];
      p.assign(nw, C(0));
      acc = p.data();
    }
    std::vector<C> abuf, gbuf, vbuf, m;
    std::vector<double> colsum;
    if (want_bias) bias_part[r].assign(static_cast<size_t>(g.cols), 0.0);
    for (int64_t b = b0; b < b1; ++b) {
      if (bias_sq != nullptr || want_bias) {
        const double bs = bias_sqnorm<Tag>(g, b, colsum);
        if (bias_sq != nullptr) bias_sq[b] = bs;
        if (want_bias) {
          double* bp = bias_part[r].data();
          for (int64_t j = 0; j < g.cols; ++j) bp[j] += colsum[j];
        }
      }
      if (t == 0 || d_in == 0 || d_out == 0) {
        weight_sq[b] = 0;
        continue;
      }
      const BlasBlock<C> pg = sample_for_blas<Tag>(g, b, gbuf);
      double s = 0;
      if constexpr (std::is_same_v<C, float>) {
        if (fast) {
          // the next sample's gradient block, when pg points into g itself (not a packed copy)
          const float* g_next =
              b + 1 < b1 && (gbuf.empty() || pg.ptr != gbuf.data()) ? pg.ptr + g.batch_stride : nullptr;
          s = sample_sqgemm(isa, pg, g_next, g.rows, g.cols, groups, d_in, d_out, vbuf, acc,
                            [&](int64_t k) { return a_block(b, k, abuf); });
          weight_sq[b] = s;
          continue;
        }
      }
      for (int64_t k = 0; k < groups; ++k) {
        const BlasBlock<C> pa = a_block(b, k, abuf);
        s += direct_block_accumulate<C>(pa, block_columns(pg, k * d_out), ti, dii, d_out, tile, m,
                                        acc + k * d_out * d_in, d_in);
      }
      weight_sq[b] = s;
    }
  });
  if (fast) {  // grad_weight[k·d_out + o, i] = Σ_ranges accᵀ[k][i, o]
    for (int64_t k = 0; k < groups; ++k) {
      for (int64_t i = 0; i < d_in; ++i) {
        for (const auto& p : partial) {
          const C* src = p.data() + (k * d_in + i) * d_out;
          C* dst = grad_weight + k * d_out * d_in + i;
          for (int64_t o = 0; o < d_out; ++o) dst[o * d_in] += src[o];
        }
      }
    }
  } else {
    for (const auto& p : partial) {
      for (size_t i = 0; i < nw; ++i) grad_weight[i] += p[i];
    }
  }
  if (want_bias) {
    for (int64_t j = 0; j < g.cols; ++j) {
      double v = 0;
      for (const auto& p : bias_part) v += p[j];
      grad_bias[j] = static_cast<C>(v);
    }
  }
}

// Sample b's unfolded input for channel group k, packed row-major [C/groups·kh·kw, L] into buf (zero padding).
// Each input plane is first copied (in the compute type) into a zero-bordered plane at the end of buf, so that
// every patch row is a plain strided read with no bounds checks.
template <typename Tag>
BlasBlock<typename Tag::compute> unfold_sample(const ConvInputView& x, int64_t b, int64_t k,
                                               std::vector<typename Tag::compute>& buf) {
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  const int64_t cg = x.channels / x.groups, kh = x.kernel_h, kw = x.kernel_w;
  const int64_t oh = x.out_h, ow = x.out_w, l = oh * ow;
  const int64_t hp = x.height + 2 * x.pad_h, wp = x.width + 2 * x.pad_w;
  const size_t rows_size = static_cast<size_t>(cg * kh * kw * l);
  buf.resize(rows_size + static_cast<size_t>(hp * wp) + 16);  // 16 floats of slack: the stride-2 path reads ahead
  C* plane = buf.data() + rows_size;
  const S* base = static_cast<const S*>(x.data) + b * x.batch_stride + k * cg * x.channel_stride;
  const int64_t sw = x.stride_w;
  for (int64_t c = 0; c < cg; ++c) {
    // the zero-bordered plane [hp, wp]: borders zeroed, interior converted from the input
    std::fill(plane, plane + x.pad_h * wp, C(0));
    std::fill(plane + (x.pad_h + x.height) * wp, plane + hp * wp, C(0));
    const S* src_plane = base + c * x.channel_stride;
    for (int64_t h = 0; h < x.height; ++h) {
      C* dst = plane + (h + x.pad_h) * wp;
      std::fill(dst, dst + x.pad_w, C(0));
      std::fill(dst + x.pad_w + x.width, dst + wp, C(0));
      const S* src = src_plane + h * x.row_stride;
      if (b + 1 < x.batch) {  // the next sample's row into L2 while this one is copied (it comes from memory)
        const char* nxt = reinterpret_cast<const char*>(src + x.batch_stride);
        const int64_t bytes = ((x.width - 1) * x.col_stride + 1) * static_cast<int64_t>(sizeof(S));
        for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(nxt + off, 0, 2);
      }
      for (int64_t w = 0; w < x.width; ++w) dst[x.pad_w + w] = load(Tag{}, src + w * x.col_stride);
    }
    for (int64_t i = 0; i < kh; ++i) {
      for (int64_t j = 0; j < kw; ++j) {
        C* row = buf.data() + ((c * kh + i) * kw + j) * l;
        for (int64_t ho = 0; ho < oh; ++ho) {
          const C* src = plane + (ho * x.stride_h + i * x.dilation_h) * wp + j * x.dilation_w;
          C* dst = row + ho * ow;
          int64_t wo = 0;
          if (sw == 1) {
            std::copy(src, src + ow, dst);
            wo = ow;
          }
#if defined(__AVX2__)
          if constexpr (std::is_same_v<C, float>) {
            // stride 2: the even floats of 16 (the 16th may lie in the next row or the slack; it is not kept)
            if (sw == 2) {
              for (; wo + 8 <= ow; wo += 8) {
                const __m256 a = _mm256_loadu_ps(src + 2 * wo), b = _mm256_loadu_ps(src + 2 * wo + 8);
                const __m256 even = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));  // x0 x2 x8 x10 | x4 x6 x12 x14
                _mm256_storeu_ps(dst + wo, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), 0xD8)));
              }
            }
          }
#endif
          for (; wo < ow; ++wo) dst[wo] = src[wo * sw];
        }
      }
    }
  }
  return {buf.data(), static_cast<int>(std::max<int64_t>(l, 1)), true};
}

// Per-sample affine gradients of a LayerNorm: for sample b, sw = Σ_t g_t ⊙ x̂_t and sb = Σ_t g_t (over positions, in
// the compute type, as torch's own reduction) with x̂_t = (x_t − mean_t)·rstd_t; their squared norms (float64) and
// their sums over the batch (per range of samples in float64, ranges added in order).
template <typename Tag>
void layernorm_impl(const BatchView& x, const BatchView& g, const typename Tag::compute* mean,
                    const typename Tag::compute* rstd, double* weight_sq, double* bias_sq,
                    typename Tag::compute* grad_weight, typename Tag::compute* grad_bias) {
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  const int64_t nb = x.batch, t = x.rows, n = x.cols;
  const bool want_w = weight_sq != nullptr || grad_weight != nullptr;
  const bool want_b = bias_sq != nullptr || grad_bias != nullptr;
  const int64_t min_per_thread = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(t * n, 1));
  const int ranges = parallel_ranges(nb, min_per_thread);
  std::vector<std::vector<double>> part(static_cast<size_t>(std::max(ranges, 1)));
  const bool unit = x.col_stride == 1 && g.col_stride == 1;
  parallel_for(nb, min_per_thread, [&](int r, int64_t b0, int64_t b1) {
    std::vector<double>& acc = part[r];
    acc.assign(static_cast<size_t>(2 * n), 0.0);
    std::vector<C> sw(static_cast<size_t>(n)), sb(static_cast<size_t>(n));
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(sw.begin(), sw.end(), C(0));
      std::fill(sb.begin(), sb.end(), C(0));
      C* pw = sw.data();
      C* pb = sb.data();
      for (int64_t i = 0; i < t; ++i) {
        const S* px = x.at<S>(b, i);
        const S* pgr = g.at<S>(b, i);
        const C mu = mean[b * t + i], rs = rstd[b * t + i];
        if (unit) {
          if (want_w) {
            for (int64_t j = 0; j < n; ++j) pw[j] += load(Tag{}, pgr + j) * ((load(Tag{}, px + j) - mu) * rs);
          }
          if (want_b) {
            for (int64_t j = 0; j < n; ++j) pb[j] += load(Tag{}, pgr + j);
          }
        } else {
          for (int64_t j = 0; j < n; ++j) {
            const C gv = load(Tag{}, pgr + j * g.col_stride);
            pw[j] += gv * ((load(Tag{}, px + j * x.col_stride) - mu) * rs);
            pb[j] += gv;
          }
        }
      }
      double ws = 0, bs = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double w = pw[j], v = pb[j];
        ws += w * w;
        bs += v * v;
        acc[j] += w;
        acc[n + j] += v;
      }
      if (weight_sq != nullptr) weight_sq[b] = ws;
      if (bias_sq != nullptr) bias_sq[b] = bs;
    }
  });
  for (int64_t j = 0; j < n; ++j) {
    double w = 0, v = 0;
    for (const auto& p : part) {
      if (p.empty()) continue;
      w += p[j];
      v += p[n + j];
    }
    if (grad_weight != nullptr) grad_weight[j] = static_cast<C>(w);
    if (grad_bias != nullptr) grad_bias[j] = static_cast<C>(v);
  }
}

// Per sample, the squared norm of the embedding's weight gradient: the output-gradient rows of every distinct token
// id summed (positions sorted by id, runs of one id added in float64), padding_idx rows skipped.
template <typename Tag>
void embedding_impl(const int64_t* idx, const BatchView& g, int64_t padding_idx, double* out) {
  using S = typename Tag::storage;
  const int64_t nb = g.batch, t = g.rows, n = g.cols;
  const int64_t min_per_thread = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(t * n, 1));
  parallel_for(nb, min_per_thread, [&](int, int64_t b0, int64_t b1) {
    std::vector<std::pair<int64_t, int64_t>> order(static_cast<size_t>(t));
    std::vector<double> row(static_cast<size_t>(n));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* ib = idx + b * t;
      for (int64_t i = 0; i < t; ++i) order[i] = {ib[i], i};
      std::sort(order.begin(), order.end());
      double s = 0;
      for (int64_t i = 0; i < t;) {
        int64_t e = i + 1;
        while (e < t && order[e].first == order[i].first) ++e;
        if (order[i].first != padding_idx) {
          std::fill(row.begin(), row.end(), 0.0);
          for (int64_t k = i; k < e; ++k) {
            const S* p = g.at<S>(b, order[k].second);
            for (int64_t j = 0; j < n; ++j) row[j] += static_cast<double>(load(Tag{}, p + j * g.col_stride));
          }
          for (int64_t j = 0; j < n; ++j) s += row[j] * row[j];
        }
        i = e;
      }
      out[b] = s;
    }
  });
}

}  // namespace

void gradnorm_linear_bk_cpu(const BatchView& a, const BatchView& g, double* weight_sq, double* bias_sq,
                            void* grad_weight, void* grad_bias) {
  PG_CHECK(a.batch == g.batch && a.rows == g.rows, "a [B, T, d_in] and g [B, T, d_out] must agree in B and T, got a [",
           a.batch, ", ", a.rows, ", ", a.cols, "] and g [", g.batch, ", ", g.rows, ", ", g.cols, "]");
  PG_CHECK_TYPE(a.dtype == g.dtype, "a and g must have the same dtype, got ", dtype_name(a.dtype), " and ",
                dtype_name(g.dtype));
  dispatch_dtype(a.dtype, [&](auto tag) {
    using Tag = decltype(tag);
    using C = typename Tag::compute;
    bookkeeping_impl<Tag>(g, 1, a.rows, a.cols, g.cols, weight_sq, bias_sq, static_cast<C*>(grad_weight),
                          static_cast<C*>(grad_bias),
                          [&](int64_t b, int64_t, std::vector<C>& buf) { return sample_for_blas<Tag>(a, b, buf); });
  });
}

void gradnorm_conv_bk_cpu(const ConvInputView& x, const BatchView& g, double* weight_sq, double* bias_sq,
                          void* grad_weight, void* grad_bias) {
  PG_CHECK(x.groups >= 1 && x.channels % x.groups == 0 && g.cols % x.groups == 0,
           "channels must be divisible by groups, got C_in = ", x.channels, ", C_out = ", g.cols,
           ", groups = ", x.groups);
  PG_CHECK(x.kernel_h >= 1 && x.kernel_w >= 1 && x.stride_h >= 1 && x.stride_w >= 1 && x.dilation_h >= 1 &&
               x.dilation_w >= 1 && x.pad_h >= 0 && x.pad_w >= 0 && x.out_h >= 0 && x.out_w >= 0,
           "invalid convolution geometry");
  PG_CHECK(x.batch == g.batch && x.out_h * x.out_w == g.rows, "x has batch ", x.batch, " and ", x.out_h * x.out_w,
           " output positions but g is [", g.batch, ", ", g.rows, ", ", g.cols, "]");
  PG_CHECK_TYPE(x.dtype == g.dtype, "x and g must have the same dtype, got ", dtype_name(x.dtype), " and ",
                dtype_name(g.dtype));
  const int64_t d_in = x.channels / x.groups * x.kernel_h * x.kernel_w;
  dispatch_dtype(x.dtype, [&](auto tag) {
    using Tag = decltype(tag);
    using C = typename Tag::compute;
    bookkeeping_impl<Tag>(g, x.groups, g.rows, d_in, g.cols / x.groups, weight_sq, bias_sq,
                          static_cast<C*>(grad_weight), static_cast<C*>(grad_bias),
                          [&](int64_t b, int64_t k, std::vector<C>& buf) { return unfold_sample<Tag>(x, b, k, buf); });
  });
}

void gradnorm_linear_cpu(const BatchView& a, const BatchView& g, GradNormMethod method, double* weight_sq,
                         double* bias_sq) {
  PG_CHECK(a.batch == g.batch && a.rows == g.rows, "a [B, T, d_in] and g [B, T, d_out] must agree in B and T, got a [",
           a.batch, ", ", a.rows, ", ", a.cols, "] and g [", g.batch, ", ", g.rows, ", ", g.cols, "]");
  PG_CHECK_TYPE(a.dtype == g.dtype, "a and g must have the same dtype, got ", dtype_name(a.dtype), " and ",
                dtype_name(g.dtype));
  if (a.batch == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) { gradnorm_impl<decltype(tag)>(a, g, method, weight_sq, bias_sq); });
}

void gradnorm_layernorm_cpu(const BatchView& x, const BatchView& g, const void* mean, const void* rstd,
                            double* weight_sq, double* bias_sq, void* grad_weight, void* grad_bias) {
  PG_CHECK(x.batch == g.batch && x.rows == g.rows && x.cols == g.cols,
           "x and g must have the same shape [B, T, N], got [", x.batch, ", ", x.rows, ", ", x.cols, "] and [", g.batch,
           ", ", g.rows, ", ", g.cols, "]");
  PG_CHECK_TYPE(x.dtype == g.dtype, "x and g must have the same dtype, got ", dtype_name(x.dtype), " and ",
                dtype_name(g.dtype));
  dispatch_dtype(x.dtype, [&](auto tag) {
    using Tag = decltype(tag);
    using C = typename Tag::compute;
    layernorm_impl<Tag>(x, g, static_cast<const C*>(mean), static_cast<const C*>(rstd), weight_sq, bias_sq,
                        static_cast<C*>(grad_weight), static_cast<C*>(grad_bias));
  });
}

void gradnorm_embedding_cpu(const int64_t* idx, const BatchView& g, int64_t padding_idx, double* out) {
  dispatch_dtype(g.dtype, [&](auto tag) { embedding_impl<decltype(tag)>(idx, g, padding_idx, out); });
}

}  // namespace pg
