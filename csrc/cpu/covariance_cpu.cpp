// Streaming per-group covariance on the CPU. Each chunk is sorted by group and its rows gathered, shifted by the
// group's running mean (one read of x). fp16/bf16/fp32 rows go to per-group fp32 row stages that are multiplied by
// SYRK when full and merged into the fp64 state every ~32k rows (see CovPending); fp64 rows, or all rows when the
// staging is off, are multiplied and merged per chunk. Merges use Chan et al.'s pairwise update.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/blas.h"
#include "common/check.h"
#include "common/group_sort.h"
#include "common/parallel.h"
#include "covariance.h"

namespace pg {

namespace {

// Rows gathered per window are capped so the compute-type buffer stays near 64 MiB whatever d is.
constexpr int64_t kWindowBytes = int64_t{64} << 20;
// Rows per SYRK call (BLAS takes 32-bit sizes; keeps calls comparable in size).
constexpr int64_t kMaxSyrkRows = 8192;
// Staged (fp32) rows per group before a merge into the fp64 state: the fp32 sums stay short, and the d x d fp64
// merge (memory-bound) runs once per this many rows instead of once per chunk.
constexpr int64_t kFlushRows = 32768;

struct Run {
  int64_t group;
  int64_t begin;  // positions in the group-sorted order
  int64_t end;
};

template <typename Tag>
bool row_finite(const MatrixView& x, int64_t r) {
  using S = typename Tag::storage;
  const S* p = x.row<S>(r);
  for (int64_t j = 0; j < x.cols; ++j)
    if (!std::isfinite(static_cast<double>(load(Tag{}, p + j * x.col_stride)))) return false;
  return true;
}

template <typename Tag>
void throw_non_finite(const MatrixView& x) {
  int64_t bad = 0, first = -1;
  for (int64_t r = 0; r < x.rows; ++r) {
    if (!row_finite<Tag>(x, r)) {
      if (first < 0) first = r;
      ++bad;
    }
  }
  if (bad > 0)
    throw std::invalid_argument(str_cat("x contains NaN or Inf in ", bad, " row(s) (first at row ", first,
                                        "); nothing from this chunk was accumulated"));
  throw std::invalid_argument(
      "x holds values so large that their sums overflow float64; nothing from this chunk was accumulated");
}

// Chan's merge of one block into group g of the state: `scatter` (upper) = Σ (x − s)(x − s)ᵀ over nb rows with
// Σ (x − s) = sums, in the compute type C.
template <typename C>
void merge_block(CovState st, int64_t g, const C* scatter, const C* shift, const double* sums, int64_t nb) {
  const int64_t d = st.dim, na = st.count[g], ntot = na + nb;
  double* mean = st.mean + g * d;
  double* m2 = st.m2 + g * d * d;
  std::vector<double> delta(d), dmu(d);
  for (int64_t j = 0; j < d; ++j) {
    delta[j] = sums[j] / static_cast<double>(nb);
    dmu[j] = na > 0 ? static_cast<double>(shift[j]) + delta[j] - mean[j] : 0.0;
  }
  const double f = na > 0 ? static_cast<double>(na) * static_cast<double>(nb) / static_cast<double>(ntot) : 0.0;
  const double nbd = static_cast<double>(nb);
  const double* __restrict dl = delta.data();
  const double* __restrict dm = dmu.data();
  for_upper_rows(d, [&](int64_t i) {
    double* __restrict mrow = m2 + i * d;
    const C* __restrict crow = scatter + i * d;
    const double ci = -nbd * dl[i], fi = f * dm[i];
    for (int64_t j = i; j < d; ++j) mrow[j] += static_cast<double>(crow[j]) + ci * dl[j] + fi * dm[j];
  });
  for (int64_t j = 0; j < d; ++j)
    mean[j] = na > 0 ? mean[j] + dm[j] * nbd / static_cast<double>(ntot) : static_cast<double>(shift[j]) + dl[j];
  st.count[g] = ntot;
}

// y = x[r] − s in the compute type, and acc += y in fp64 (one row of a gather).
template <typename Tag, typename C>
inline void shift_row(const MatrixView& x, int64_t r, const C* __restrict s, C* __restrict y, double* __restrict acc) {
  using S = typename Tag::storage;
  const S* __restrict src = x.row<S>(r);
  const int64_t d = x.cols;
  if (x.col_stride == 1) {
    for (int64_t j = 0; j < d; ++j) {
      const C v = load(Tag{}, src + j) - s[j];
      y[j] = v;
      acc[j] += static_cast<double>(v);
    }
  } else {
    for (int64_t j = 0; j < d; ++j) {
      const C v = load(Tag{}, src + j * x.col_stride) - s[j];
      y[j] = v;
      acc[j] += static_cast<double>(v);
    }
  }
}

// Merges the scatter stage of group g into the state and starts a new block.
void merge_stage(CovState st, CovPending pend, int64_t g) {
  const int64_t d = st.dim;
  if (pend.n[g] == 0) return;
  merge_block<float>(st, g, pend.c + g * d * d, pend.shift + g * d, pend.sum + g * d, pend.n[g]);
  pend.n[g] = 0;
  std::fill(pend.sum + g * d, pend.sum + (g + 1) * d, 0.0);
}

// Multiplies the row stages of `groups` into their scatter stages; merges those with enough rows. Several stages
// run side by side, one single-threaded SYRK per thread: OpenBLAS's threaded SYRK on a few thousand rows spends a
// quarter of its time in its threads' spin-synchronisation.
void syrk_stages(CovState st, CovPending pend, const std::vector<int64_t>& groups) {
  const int64_t d = st.dim;
  const int di = blas_int(d, "n_features");
  auto multiply = [&](int64_t g) {
    syrk_ata<float>(di, blas_int(pend.rows_n[g], "rows"), 1.0f, pend.rows + g * pend.rows_cap * d, di,
                    pend.n[g] > 0 ? 1.0f : 0.0f, pend.c + g * d * d, di);
  };
  std::vector<int64_t> todo;
  for (int64_t g : groups)
    if (pend.rows_n[g] > 0) todo.push_back(g);
  if (todo.size() == 1) {
    multiply(todo[0]);
  } else if (todo.size() > 1) {
    SingleThreadedBlas single(true);
    parallel_for(static_cast<int64_t>(todo.size()), 1, [&](int, int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) multiply(todo[i]);
    });
  }
  for (int64_t g : todo) {
    pend.n[g] += pend.rows_n[g];
    pend.rows_n[g] = 0;
    if (pend.n[g] >= kFlushRows) merge_stage(st, pend, g);
  }
}

template <typename Tag>
bool chunk_finite(const MatrixView& x) {
  bool finite = true;
  for (int64_t r = 0; r < x.rows && finite; ++r) finite = row_finite<Tag>(x, r);
  return finite;
}

// Staged path (fp16/bf16/fp32 input): the shifted rows go to each group's row stage; full stages are multiplied.
template <typename Tag>
void staged_update(const MatrixView& x, const std::vector<int64_t>& offset, const std::vector<int64_t>& perm,
                   const std::vector<float>& shift, CovState st, CovPending pend) {
  const int64_t d = x.cols, G = st.n_groups, R = pend.rows_cap;
  // Make room first: a stage that cannot take this chunk's rows is multiplied now (it holds only rows of earlier,
  // already validated chunks). Then only a group with more than R rows in this one chunk fills a stage before the
  // whole chunk is read; in that case the chunk is checked whole first, so that a bad row leaves everything as it
  // was. Otherwise the sums below reveal bad rows before anything is committed.
  bool fills = false;
  std::vector<int64_t> full;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t cnt = offset[g + 1] - offset[g];
    if (cnt > 0 && pend.rows_n[g] + cnt > R) full.push_back(g);
    fills = fills || cnt > R;
  }
  syrk_stages(st, pend, full);
  if (fills && !chunk_finite<Tag>(x)) throw_non_finite<Tag>(x);

  struct Piece {
    int64_t group, src, count, dst;  // rows perm[src, src + count) -> stage rows [dst, dst + count)
  };
  std::vector<int64_t> taken(G, 0);
  for (;;) {
    std::vector<Piece> pieces;
    std::vector<int64_t> start{0};
    for (int64_t g = 0; g < G; ++g) {
      const int64_t take = std::min(offset[g + 1] - offset[g] - taken[g], R - pend.rows_n[g]);
      if (take <= 0) continue;
      pieces.push_back({g, offset[g] + taken[g], take, pend.rows_n[g]});
      start.push_back(start.back() + take);
    }
    if (pieces.empty()) break;
    const int64_t total = start.back();
    const int n_ranges = parallel_ranges(total, 256);
    std::vector<std::vector<double>> part(n_ranges);
    std::vector<size_t> part_first(n_ranges, 0);
    parallel_for(total, 256, [&](int t, int64_t b, int64_t e) {
      size_t pi = 0;
      while (start[pi + 1] <= b) ++pi;
      part_first[t] = pi;
      size_t last = pi;
      while (last + 1 < pieces.size() && start[last + 1] < e) ++last;
      std::vector<double>& sums = part[t];
      sums.assign((last - pi + 1) * d, 0.0);
      for (int64_t q = b; q < e; ++q) {
        while (start[pi + 1] <= q) ++pi;
        const Piece& pc = pieces[pi];
        const int64_t i = q - start[pi];
        shift_row<Tag>(x, perm[pc.src + i], shift.data() + pc.group * d, pend.rows + (pc.group * R + pc.dst + i) * d,
                       sums.data() + (pi - part_first[t]) * d);
      }
    });
    std::vector<double> piece_sums(pieces.size() * d, 0.0);
    for (int t = 0; t < n_ranges; ++t) {
      const size_t np = part[t].size() / d;
      for (size_t k = 0; k < np; ++k)
        for (int64_t j = 0; j < d; ++j) piece_sums[(part_first[t] + k) * d + j] += part[t][k * d + j];
    }
    if (!fills) {
      for (double v : piece_sums)
        if (!std::isfinite(v)) throw_non_finite<Tag>(x);
    }
    // Commit, then multiply the stages that are full.
    full.clear();
    for (size_t pi = 0; pi < pieces.size(); ++pi) {
      const Piece& pc = pieces[pi];
      const int64_t g = pc.group;
      if (pend.n[g] == 0 && pend.rows_n[g] == 0)
        std::copy(shift.data() + g * d, shift.data() + (g + 1) * d, pend.shift + g * d);
      double* psum = pend.sum + g * d;
      for (int64_t j = 0; j < d; ++j) psum[j] += piece_sums[pi * d + j];
      pend.rows_n[g] += pc.count;
      taken[g] += pc.count;
      if (pend.rows_n[g] == R) full.push_back(g);
    }
    syrk_stages(st, pend, full);
  }
}

template <typename Tag>
void update_impl(const MatrixView& x, const int64_t* groups, CovState st, CovPending pend) {
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  const int64_t n = x.rows, d = x.cols, G = st.n_groups;
  constexpr bool staged_type = std::is_same_v<C, float>;
  const bool staged = staged_type && pend.enabled();

  const GroupOrder order(groups, n, G);
  const std::vector<int64_t>& offset = order.offset;
  const std::vector<int64_t>& perm = order.perm;
  const std::vector<int64_t>& group_of = order.group_of;

  // Shift per group: the running mean when the group has data, else the mean of its rows in this chunk (an extra
  // read of those rows, once per group). A shift far from the mean (say, one sample) leaves a rank-one part of size
  // n·|x₀ − μ|² ≈ n·d·σ² in the fp32 products that the fp64 correction then cancels, losing ~sqrt(d) in accuracy.
  std::vector<C> shift(static_cast<size_t>(G) * d);
  std::vector<double> first_mean;
  for (int64_t g = 0; g < G; ++g) {
    if (offset[g + 1] == offset[g]) continue;
    C* s = shift.data() + g * d;
    if (staged && (pend.n[g] > 0 || pend.rows_n[g] > 0)) {
      for (int64_t j = 0; j < d; ++j) s[j] = static_cast<C>(pend.shift[g * d + j]);
    } else if (st.count[g] > 0) {
      for (int64_t j = 0; j < d; ++j) s[j] = static_cast<C>(st.mean[g * d + j]);
    } else {
      first_mean.assign(d, 0.0);
      for (int64_t p = offset[g]; p < offset[g + 1]; ++p) {
        const S* src = x.row<S>(perm[p]);
        for (int64_t j = 0; j < d; ++j) first_mean[j] += static_cast<double>(load(Tag{}, src + j * x.col_stride));
      }
      const double inv = 1.0 / static_cast<double>(offset[g + 1] - offset[g]);
      // A non-finite mean is caught with the sums below; keep the shift finite meanwhile.
      for (int64_t j = 0; j < d; ++j) s[j] = std::isfinite(first_mean[j]) ? static_cast<C>(first_mean[j] * inv) : C(0);
    }
  }

  if constexpr (staged_type) {
    if (staged) {
      staged_update<Tag>(x, offset, perm, shift, st, pend);
      return;
    }
  }

  const int64_t window = std::max<int64_t>(64, kWindowBytes / (std::max<int64_t>(d, 1) * int64_t(sizeof(C))));
  const bool one_window = n <= window;
  if (!one_window) {
    // Several windows merge separately: check the whole chunk first so a bad row leaves the state untouched.
    bool finite = true;
    for (int64_t r = 0; r < n && finite; ++r) finite = row_finite<Tag>(x, r);
    if (!finite) throw_non_finite<Tag>(x);
  }

  // Working buffers persist across calls (per calling thread): re-touching fresh pages on every chunk costs more
  // than the gather itself.
  static thread_local std::vector<C> buf, scatter;
  if (buf.size() < static_cast<size_t>(std::min(n, window) * d)) buf.resize(std::min(n, window) * d);
  if (scatter.size() < static_cast<size_t>(d * d)) scatter.resize(d * d);
  // Lambdas below run on other threads: they must see this thread's buffers, not their own thread_local ones.
  C* const buf_data = buf.data();
  C* const scatter_data = scatter.data();

  for (int64_t w0 = 0; w0 < n; w0 += window) {
    const int64_t w1 = std::min(n, w0 + window);
    // Runs of one group inside the window.
    std::vector<Run> runs;
    for (int64_t p = w0; p < w1;) {
      const int64_t g = group_of[p];
      const int64_t e = std::min(w1, offset[g + 1]);
      runs.push_back({g, p, e});
      p = e;
    }
    // Gather + shift, with per-run column sums in fp64 (each thread owns the runs its range touches).
    const int n_ranges = parallel_ranges(w1 - w0, 256);
    std::vector<std::vector<double>> part_sums(n_ranges);
    std::vector<size_t> part_first_run(n_ranges, 0);
    parallel_for(w1 - w0, 256, [&](int t, int64_t b, int64_t e) {
      size_t ri = 0;
      while (runs[ri].end <= w0 + b) ++ri;
      part_first_run[t] = ri;
      size_t last = ri;
      while (last + 1 < runs.size() && runs[last + 1].begin < w0 + e) ++last;
      std::vector<double>& sums = part_sums[t];
      sums.assign((last - ri + 1) * d, 0.0);
      for (int64_t q = b; q < e; ++q) {
        const int64_t p = w0 + q;
        while (runs[ri].end <= p) ++ri;
        const int64_t g = runs[ri].group;
        shift_row<Tag>(x, perm[p], shift.data() + g * d, buf_data + q * d, sums.data() + (ri - part_first_run[t]) * d);
      }
    });
    std::vector<double> run_sums(runs.size() * d, 0.0);
    for (int t = 0; t < n_ranges; ++t) {
      const size_t nr = part_sums[t].size() / std::max<int64_t>(d, 1);
      for (size_t k = 0; k < nr; ++k) {
        double* dst = run_sums.data() + (part_first_run[t] + k) * d;
        const double* src = part_sums[t].data() + k * d;
        for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
      }
    }
    if (one_window) {
      for (double v : run_sums)
        if (!std::isfinite(v)) throw_non_finite<Tag>(x);
    }

    // Per run: scatter of the shifted rows by SYRK in the compute type, then Chan's merge into the fp64 state.
    for (size_t ri = 0; ri < runs.size(); ++ri) {
      const Run& run = runs[ri];
      for (int64_t k0 = run.begin; k0 < run.end; k0 += kMaxSyrkRows) {
        const int64_t kr = std::min(run.end, k0 + kMaxSyrkRows) - k0;
        syrk_ata<C>(blas_int(d, "n_features"), blas_int(kr, "rows"), C(1), buf_data + (k0 - w0) * d,
                    blas_int(d, "n_features"), k0 == run.begin ? C(0) : C(1), scatter_data, blas_int(d, "n_features"));
      }
      merge_block<C>(st, run.group, scatter_data, shift.data() + run.group * d, run_sums.data() + ri * d,
                     run.end - run.begin);
    }
  }
}

}  // namespace

void covariance_flush_cpu(CovState st, CovPending pend) {
  if (!pend.enabled()) return;
  std::vector<int64_t> all(st.n_groups);
  for (int64_t g = 0; g < st.n_groups; ++g) all[g] = g;
  syrk_stages(st, pend, all);
  for (int64_t g = 0; g < st.n_groups; ++g) merge_stage(st, pend, g);
}

void covariance_update_cpu(const MatrixView& x, const int64_t* groups, CovState st, CovPending pend) {
  PG_CHECK(x.cols == st.dim, "x has ", x.cols, " features but the accumulator was built for ", st.dim);
  PG_CHECK(st.n_groups >= 1, "n_groups must be >= 1");
  if (x.rows == 0) return;
  if (st.dim == 0) {
    for (int64_t r = 0; r < x.rows; ++r) {
      const int64_t g = groups ? groups[r] : 0;
      PG_CHECK(g >= 0 && g < st.n_groups, "group id ", g, " at row ", r, " is outside [0, ", st.n_groups, ")");
    }
    for (int64_t r = 0; r < x.rows; ++r) ++st.count[groups ? groups[r] : 0];
    return;
  }
  // float64 chunks bypass the fp32 staging: merge what is staged first so every row lands once, in order.
  if (x.dtype == DType::float64) covariance_flush_cpu(st, pend);
  dispatch_dtype(x.dtype, [&](auto tag) { update_impl<decltype(tag)>(x, groups, st, pend); });
}

void covariance_merge_cpu(CovState a, const CovState& b) {
  PG_CHECK(a.dim == b.dim, "cannot merge accumulators of ", b.dim, " features into one of ", a.dim);
  PG_CHECK(a.n_groups == b.n_groups, "cannot merge accumulators of ", b.n_groups, " groups into one of ", a.n_groups);
  const int64_t d = a.dim;
  std::vector<double> dmu(d);
  for (int64_t g = 0; g < a.n_groups; ++g) {
    const int64_t na = a.count[g], nb = b.count[g], n = na + nb;
    if (nb == 0) continue;
    double* ma = a.mean + g * d;
    const double* mb = b.mean + g * d;
    double* sa = a.m2 + g * d * d;
    const double* sb = b.m2 + g * d * d;
    const double f = static_cast<double>(na) * static_cast<double>(nb) / static_cast<double>(n);
    for (int64_t j = 0; j < d; ++j) dmu[j] = mb[j] - ma[j];
    for_upper_rows(d, [&](int64_t i) {
      for (int64_t j = i; j < d; ++j) sa[i * d + j] += sb[i * d + j] + f * dmu[i] * dmu[j];
    });
    for (int64_t j = 0; j < d; ++j) ma[j] = na > 0 ? ma[j] + dmu[j] * static_cast<double>(nb) / n : mb[j];
    a.count[g] = n;
  }
}

}  // namespace pg
