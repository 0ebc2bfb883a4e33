// Fused centre-project-score on the CPU: rows are sorted by class, gathered a block at a time into a per-thread
// buffer (centred in fp64, stored in the compute type) and multiplied by the class's directions with GEMM.
#include <algorithm>
#include <vector>

#include "common/blas.h"
#include "common/check.h"
#include "common/group_sort.h"
#include "common/parallel.h"
#include "projection.h"

namespace pg {

namespace {

constexpr int64_t kBlockRows = 256;

template <typename Tag>
void project_impl(const MatrixView& x, const int64_t* groups, int64_t G, const double* means, const void* dirs_v,
                  int64_t k, void* proj_v, double* score, const double* que, double* que_score) {
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  const int64_t n = x.rows, d = x.cols;
  const C* dirs = static_cast<const C*>(dirs_v);
  C* proj = static_cast<C*>(proj_v);

  const GroupOrder order(groups, n, G);
  const std::vector<int64_t>& offset = order.offset;
  const std::vector<int64_t>& perm = order.perm;
  const std::vector<int64_t>& group_of = order.group_of;
  const int di = blas_int(d, "n_features"), ki = blas_int(k, "n_components");
  const int T = parallel_ranges(n, kBlockRows);
  SingleThreadedBlas single(T > 1);
  parallel_for(n, kBlockRows, [&](int, int64_t b, int64_t e) {
    std::vector<C> buf(static_cast<size_t>(kBlockRows) * d), out(static_cast<size_t>(kBlockRows) * k);
    for (int64_t p0 = b; p0 < e;) {
      const int64_t g = group_of[p0];
      const int64_t p1 = std::min({e, offset[g + 1], p0 + kBlockRows});
      const double* mu = means + g * d;
      for (int64_t p = p0; p < p1; ++p) {
        const S* src = x.row<S>(perm[p]);
        C* y = buf.data() + (p - p0) * d;
        for (int64_t j = 0; j < d; ++j)
          y[j] = static_cast<C>(static_cast<double>(load(Tag{}, src + j * x.col_stride)) - mu[j]);
      }
      const int rows = static_cast<int>(p1 - p0);
      gemm<C>(false, false, rows, ki, di, C(1), buf.data(), di, dirs + g * d * k, ki, C(0), out.data(), ki);
      const double* m = que ? que + g * k * k : nullptr;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t r = perm[p];
        const C* pr = out.data() + (p - p0) * k;
        double s = 0;
        for (int64_t j = 0; j < k; ++j) s += static_cast<double>(pr[j]) * static_cast<double>(pr[j]);
        score[r] = s;
        if (proj) std::copy(pr, pr + k, proj + r * k);
        if (m) {
          double q = 0;
          for (int64_t i = 0; i < k; ++i) {
            double row = 0;
            for (int64_t j = 0; j < k; ++j) row += m[i * k + j] * static_cast<double>(pr[j]);
            q += static_cast<double>(pr[i]) * row;
          }
          que_score[r] = q;
        }
      }
      p0 = p1;
    }
  });
}

// Rows per gathered block of the power pass: about 4 MB per thread, so the block stays in cache between its two
// products.
int64_t power_block_rows(int64_t d, int64_t elem) {
  return std::clamp<int64_t>((int64_t{4} << 20) / std::max<int64_t>(1, d * elem), 16, 4096);
}

template <typename Tag>
void segmented_power_impl(const MatrixView& x, const int64_t* groups, int64_t G, const double* shift, const void* q_v,
                          int64_t l, double* z, double* sums, int64_t* counts) {
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  const int64_t n = x.rows, d = x.cols;
  const C* q = static_cast<const C*>(q_v);
  const GroupOrder order(groups, n, G);
  const std::vector<int64_t>& offset = order.offset;
  const std::vector<int64_t>& perm = order.perm;
  const std::vector<int64_t>& group_of = order.group_of;
  for (int64_t g = 0; g < G; ++g) counts[g] += offset[g + 1] - offset[g];
  const int64_t br = power_block_rows(d, sizeof(C));
  const int di = blas_int(d, "n_features"), li = blas_int(l, "l");
  const int T = parallel_ranges(n, br);
  // Threads own contiguous ranges of the class-sorted rows. A class wholly inside one range is written directly;
  // a class cut by a range boundary is summed into the thread's private buffers and merged after the join.
  struct Shared {
    int64_t g = -1;
    std::vector<double> z, sums;
  };
  std::vector<std::vector<Shared>> shared(T);
  SingleThreadedBlas single(T > 1);
  parallel_for(n, br, [&](int t, int64_t b, int64_t e) {
    std::vector<C> buf(static_cast<size_t>(br) * d), y(static_cast<size_t>(br) * l), zpart(static_cast<size_t>(d) * l);
    for (int64_t p0 = b; p0 < e;) {
      const int64_t g = group_of[p0];
      const int64_t g_end = std::min(e, offset[g + 1]);
      double* zg = z + g * d * l;
      double* sg = sums + g * d;
      if (offset[g] < b || offset[g + 1] > e) {  // cut by a boundary: private
        shared[t].push_back({g, std::vector<double>(static_cast<size_t>(d) * l), std::vector<double>(d)});
        zg = shared[t].back().z.data();
        sg = shared[t].back().sums.data();
      }
      const double* s = shift + g * d;
      const C* qg = q + g * d * l;
      for (; p0 < g_end;) {
        const int64_t p1 = std::min(g_end, p0 + br);
        for (int64_t p = p0; p < p1; ++p) {
          const S* src = x.row<S>(perm[p]);
          C* u = buf.data() + (p - p0) * d;
          for (int64_t j = 0; j < d; ++j) {
            const double v = static_cast<double>(load(Tag{}, src + j * x.col_stride)) - s[j];
            u[j] = static_cast<C>(v);
            sg[j] += v;
          }
        }
        const int rows = static_cast<int>(p1 - p0);
        gemm<C>(false, false, rows, li, di, C(1), buf.data(), di, qg, li, C(0), y.data(), li);           // U Q
        gemm<C>(true, false, di, li, rows, C(1), buf.data(), di, y.data(), li, C(0), zpart.data(), li);  // Uᵀ(UQ)
        for (int64_t i = 0; i < d * l; ++i) zg[i] += static_cast<double>(zpart[i]);
        p0 = p1;
      }
    }
  });
  for (int t = 0; t < T; ++t)
    for (const Shared& sh : shared[t]) {
      double* zg = z + sh.g * d * l;
      double* sg = sums + sh.g * d;
      for (int64_t i = 0; i < d * l; ++i) zg[i] += sh.z[i];
      for (int64_t j = 0; j < d; ++j) sg[j] += sh.sums[j];
    }
}

}  // namespace

void segmented_power_pass_cpu(const MatrixView& x, const int64_t* groups, int64_t n_groups, const double* shift,
                              const void* q, int64_t l, double* z, double* sums, int64_t* counts) {
  PG_CHECK(n_groups >= 1, "n_groups must be >= 1");
  PG_CHECK(l >= 1, "l must be >= 1");
  if (x.rows == 0) return;
  if (x.cols == 0) {
    const GroupOrder order(groups, x.rows, n_groups);
    for (int64_t g = 0; g < n_groups; ++g) counts[g] += order.offset[g + 1] - order.offset[g];
    return;
  }
  dispatch_dtype(x.dtype, [&](auto tag) {
    segmented_power_impl<decltype(tag)>(x, groups, n_groups, shift, q, l, z, sums, counts);
  });
}

void project_scores_cpu(const MatrixView& x, const int64_t* groups, int64_t n_groups, const double* means,
                        const void* dirs, int64_t k, void* proj, double* score, const double* que, double* que_score) {
  PG_CHECK(n_groups >= 1, "n_groups must be >= 1");
  PG_CHECK(k >= 1, "n_components must be >= 1");
  if (x.rows == 0) return;
  if (x.cols == 0) {
    std::fill(score, score + x.rows, 0.0);
    if (que_score) std::fill(que_score, que_score + x.rows, 0.0);
    if (proj) std::fill_n(static_cast<char*>(proj), x.rows * k * (x.dtype == DType::float64 ? 8 : 4), 0);
    return;
  }
  dispatch_dtype(x.dtype, [&](auto tag) {
    project_impl<decltype(tag)>(x, groups, n_groups, means, dirs, k, proj, score, que, que_score);
  });
}

}  // namespace pg
