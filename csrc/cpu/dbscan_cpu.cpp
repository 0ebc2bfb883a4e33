// Exact DBSCAN for low dimensions on a kd-tree (leaves of ~128 rows, each stored column by column so that the
// distances from a query to a leaf's rows are one vectorised loop per column).
//
// 1. core rows: a range count from every row (threads over rows) that stops at min_samples; a box wholly inside the
//    ball adds its size without touching its rows. The first min(min_samples, 32) rows found within eps are kept.
// 2. clusters (union-find over tree positions):
//    a. every core row is united with the core rows it kept: a near-neighbour graph that already joins most of each
//       cluster;
//    b. the nodes whose core rows are all in one set are marked ("same", bottom-up; the mark only ever turns on);
//    c. a complete search from every core row (threads, sharing the union-find through atomics): a same node in the
//    query's set is skipped whatever its geometry, a
//       same node of another set needs one core row within eps (the search stops at the first), other nodes are
//       searched. After (a) most nodes are same, so this costs about a tree descent per row.
// 3. borders: a non-core row joins the cluster with the smallest number among its core rows within eps, which is
//    scikit-learn's rule (its expansion numbers clusters by their smallest core row, and the first cluster to reach
//    a border row keeps it). With min_samples <= 32 the rows kept in step 1 are all of a non-core row's neighbours;
//    otherwise a search (threads).
//
// Distances: float32 sums of squares decide where they are clearly inside or outside eps^2; within a relative band
// of 1e-5 (far wider than the rounding of a sum of d squares) the distance is recomputed exactly in float64, so a
// row is a neighbour iff its float64 squared distance is <= eps^2 (scikit-learn's radius test on the float32 rows).
// Box bounds prune and include only outside that band. Clusters are numbered by their smallest core row.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "cluster.h"
#include "common/check.h"
#include "common/parallel.h"
#include "common/union_find.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PG_DBSCAN_AVX2 1
#endif

namespace pg {
namespace {

// Neighbours recorded per row in the core pass (at most min_samples).
constexpr int64_t kRecord = 32;

struct Node {
  int64_t begin = 0, end = 0;  // rows [begin, end) in tree order
  int32_t left = -1, right = -1;
  int64_t n_core = 0;
  int64_t rep = -1;   // a core row of the node (tree position), -1 when none
  bool same = false;  // all core rows of the node are in one set (only ever turns true)
  int64_t soa = 0;    // leaves: offset of the column-major block (rows padded to a multiple of 8 with +inf)
};

inline int64_t padded_rows(int64_t m) {
  return (m + 7) / 8 * 8;
}

inline float lane_sum(const float* a) {
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

class Tree {
 public:
  Tree(const float* x, int64_t n, int64_t d, int64_t ld, int64_t leaf_size)
      : n_(n), d_(d), dp_((d + 7) / 8 * 8), leaf_(std::max<int64_t>(1, leaf_size)) {
    perm_.resize(static_cast<size_t>(n));
    std::iota(perm_.begin(), perm_.end(), int64_t{0});
    nodes_.reserve(static_cast<size_t>(2 * (n / leaf_ + 1)));
    src_ = x;
    ld_ = ld;
    if (n > 0) build(0, n);
    pts_.assign(static_cast<size_t>(n * dp_), 0.0f);
    for (int64_t p = 0; p < n; ++p) {
      const float* row = x + perm_[p] * ld;
      std::copy(row, row + d, pts_.data() + p * dp_);
    }
    int64_t total = 0;
    for (Node& nd : nodes_) {
      if (nd.left >= 0) continue;
      nd.soa = total;
      total += padded_rows(nd.end - nd.begin) * d;
    }
    soa_.assign(static_cast<size_t>(total), std::numeric_limits<float>::infinity());
    for (const Node& nd : nodes_) {
      if (nd.left >= 0) continue;
      const int64_t m = nd.end - nd.begin, mp = padded_rows(m);
      float* blk = soa_.data() + nd.soa;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < d; ++j) blk[j * mp + i] = pts_[(nd.begin + i) * dp_ + j];
    }
  }

  // Squared distances (float32) from q to the rows of leaf nd, into out[0 : padded rows of nd] (padding rows get
  // +inf); returns how many are <= limit (most leaves a search reaches hold none, and are then done with).
  int64_t leaf_d2(const Node& nd, const float* __restrict__ q, float* __restrict__ out, float limit) const {
    const int64_t mp = padded_rows(nd.end - nd.begin);
    const float* __restrict__ blk = soa_.data() + nd.soa;
    int64_t near = 0;
#if defined(PG_DBSCAN_AVX2)
    // Blocks of 32 rows: four 8-lane sums stay in registers across all columns.
    const __m256 lim = _mm256_set1_ps(limit);
    int64_t i0 = 0;
    for (; i0 + 32 <= mp; i0 += 32) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < d_; ++j) {
        const __m256 qj = _mm256_set1_ps(q[j]);
        const float* col = blk + j * mp + i0;
        const __m256 v0 = _mm256_sub_ps(_mm256_loadu_ps(col), qj), v1 = _mm256_sub_ps(_mm256_loadu_ps(col + 8), qj);
        const __m256 v2 = _mm256_sub_ps(_mm256_loadu_ps(col + 16), qj),
                     v3 = _mm256_sub_ps(_mm256_loadu_ps(col + 24), qj);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
        a2 = _mm256_fmadd_ps(v2, v2, a2);
        a3 = _mm256_fmadd_ps(v3, v3, a3);
      }
      _mm256_storeu_ps(out + i0, a0);
      _mm256_storeu_ps(out + i0 + 8, a1);
      _mm256_storeu_ps(out + i0 + 16, a2);
      _mm256_storeu_ps(out + i0 + 24, a3);
      near += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a0, lim, _CMP_LE_OQ)))) +
              __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a1, lim, _CMP_LE_OQ)))) +
              __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a2, lim, _CMP_LE_OQ)))) +
              __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a3, lim, _CMP_LE_OQ))));
    }
    for (; i0 < mp; i0 += 8) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t j = 0; j < d_; ++j) {
        const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(blk + j * mp + i0), _mm256_set1_ps(q[j]));
        a = _mm256_fmadd_ps(v, v, a);
      }
      _mm256_storeu_ps(out + i0, a);
      near += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a, lim, _CMP_LE_OQ))));
    }
#else
    for (int64_t i = 0; i < mp; ++i) out[i] = 0.0f;
    for (int64_t j = 0; j < d_; ++j) {
      const float qj = q[j];
      const float* __restrict__ col = blk + j * mp;
      for (int64_t i = 0; i < mp; ++i) {
        const float v = col[i] - qj;
        out[i] += v * v;
      }
    }
    for (int64_t i = 0; i < mp; ++i) near += out[i] <= limit;
#endif
    return near;
  }

  int64_t n() const { return n_; }
  int64_t d() const { return d_; }
  const float* row(int64_t p) const { return pts_.data() + p * dp_; }
  const std::vector<int64_t>& perm() const { return perm_; }
  std::vector<Node>& nodes() { return nodes_; }
  const std::vector<Node>& nodes() const { return nodes_; }
  const float* lo(int32_t k) const { return box_.data() + 2 * static_cast<int64_t>(k) * dp_; }
  const float* hi(int32_t k) const { return lo(k) + dp_; }
  bool leaf(const Node& nd) const { return nd.left < 0; }
  int64_t max_leaf() const {
    int64_t m = 1;
    for (const Node& nd : nodes_)
      if (nd.left < 0) m = std::max(m, padded_rows(nd.end - nd.begin));
    return m;
  }

  // Squared distance (float32) from q (padded row) to the nearest / farthest point of node k's box. Padding
  // columns are zero in rows and boxes, so they add nothing; the padded width lets the loops vectorise whole.
  float min_d2(const float* __restrict__ q, int32_t k) const {
    const float* __restrict__ l = lo(k);
    const float* __restrict__ h = hi(k);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // lane sums: a vector register, no reassociation needed
    for (int64_t j = 0; j < dp_; j += 8) {
      for (int c = 0; c < 8; ++c) {
        const float a = std::max(l[j + c] - q[j + c], 0.0f), b = std::max(q[j + c] - h[j + c], 0.0f);
        acc[c] += a * a + b * b;
      }
    }
    return lane_sum(acc);
  }
  float max_d2(const float* __restrict__ q, int32_t k) const {
    const float* __restrict__ l = lo(k);
    const float* __restrict__ h = hi(k);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < dp_; j += 8) {
      for (int c = 0; c < 8; ++c) {
        const float v = std::max(q[j + c] - l[j + c], h[j + c] - q[j + c]);
        acc[c] += v * v;
      }
    }
    return lane_sum(acc);
  }
  // Squared distance between q and row p in float64 (float32 differences are exact in float64).
  double exact_d2(const float* q, int64_t p) const {
    const float* b = row(p);
    double s = 0;
    for (int64_t j = 0; j < d_; ++j) {
      const double v = double(q[j]) - b[j];
      s += v * v;
    }
    return s;
  }

 private:
  int32_t build(int64_t b, int64_t e) {
    const int32_t k = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();
    nodes_[k].begin = b;
    nodes_[k].end = e;
    box_.resize(box_.size() + static_cast<size_t>(2 * dp_), 0.0f);
    // Tight box of the rows (padding columns stay 0).
    float* l = box_.data() + 2 * static_cast<int64_t>(k) * dp_;
    float* h = l + dp_;
    std::fill(l, l + d_, std::numeric_limits<float>::infinity());
    std::fill(h, h + d_, -std::numeric_limits<float>::infinity());
    for (int64_t i = b; i < e; ++i) {
      const float* r = src_ + perm_[i] * ld_;
      for (int64_t j = 0; j < d_; ++j) {
        l[j] = std::min(l[j], r[j]);
        h[j] = std::max(h[j], r[j]);
      }
    }
    if (e - b <= leaf_) return k;
    int64_t dim = 0;
    float wide = -1;
    for (int64_t j = 0; j < d_; ++j)
      if (h[j] - l[j] > wide) wide = h[j] - l[j], dim = j;
    if (!(wide > 0)) return k;  // all rows equal: one leaf
    const int64_t mid = b + (e - b) / 2;
    const float* xs = src_;
    const int64_t ld = ld_;
    std::nth_element(perm_.begin() + b, perm_.begin() + mid, perm_.begin() + e,
                     [xs, ld, dim](int64_t u, int64_t v) { return xs[u * ld + dim] < xs[v * ld + dim]; });
    const int32_t left = build(b, mid);
    const int32_t right = build(mid, e);
    nodes_[k].left = left;
    nodes_[k].right = right;
    return k;
  }

  int64_t n_, d_, dp_, leaf_;
  const float* src_ = nullptr;
  int64_t ld_ = 0;
  std::vector<int64_t> perm_;
  std::vector<float> pts_;  // rows in tree order
  std::vector<float> soa_;  // each leaf's rows column by column
  std::vector<Node> nodes_;
  std::vector<float> box_;
};

// The radius test: float32 distances below lo are in, above hi out; the band between is decided in float64 (float32
// rounding of a sum of d squares is far below the band's relative width). Boxes (float32) prune only outside the
// band, so rounding never drops a row within eps nor counts one beyond it.
struct Radius {
  double eps2;
  float lo, hi;
  Radius(double e2, int64_t d) : eps2(e2) {
    const double band = std::max(1e-5, 8e-7 * static_cast<double>(d + 4));
    lo = static_cast<float>(e2 * (1 - band));
    hi = static_cast<float>(e2 * (1 + band));
  }
  bool within(const Tree& t, const float* q, int64_t p, float f) const {
    if (f < lo) return true;
    if (f > hi) return false;
    return t.exact_d2(q, p) <= eps2;
  }
  bool box_out(float min_d2) const { return min_d2 > hi; }
  bool box_in(float max_d2) const { return max_d2 < lo; }
};

// A node to visit and the squared distance from the query to its box.
struct Visit {
  int32_t k;
  float md;
};

// Per-thread scratch: the traversal stacks and a leaf's distances.
struct Scratch {
  std::vector<Visit> stack, inner;
  std::vector<float> dist;
  explicit Scratch(int64_t leaf) : dist(static_cast<size_t>(leaf)) {}
};

// Pushes the children of nd that may hold rows within eps, the nearer one last (searched first).
inline void push_children(const Tree& t, const Radius& r, const Node& nd, const float* q, std::vector<Visit>& stack) {
  const float ml = t.min_d2(q, nd.left), mr = t.min_d2(q, nd.right);
  const bool l_out = r.box_out(ml), r_out = r.box_out(mr);
  if (ml <= mr) {
    if (!r_out) stack.push_back({nd.right, mr});
    if (!l_out) stack.push_back({nd.left, ml});
  } else {
    if (!l_out) stack.push_back({nd.left, ml});
    if (!r_out) stack.push_back({nd.right, mr});
  }
}

// Rows within eps of q, counted up to `need` (returns a value >= need as soon as that many are seen). The first
// `cap` rows found within eps are written to rec (tree positions), their number to *n_rec.
int64_t count_within(const Tree& t, const Radius& r, const float* q, int64_t need, int32_t* rec, int64_t cap,
                     int64_t* n_rec, Scratch& s) {
  const auto& nodes = t.nodes();
  int64_t count = 0, nr = 0;
  auto& stack = s.stack;
  stack.clear();
  const float m0 = t.min_d2(q, 0);
  if (!r.box_out(m0)) stack.push_back({0, m0});
  while (!stack.empty()) {
    const int32_t k = stack.back().k;
    stack.pop_back();
    const Node& nd = nodes[k];
    if (r.box_in(t.max_d2(q, k))) {
      count += nd.end - nd.begin;
      for (int64_t u = nd.begin; u < nd.end && nr < cap; ++u) rec[nr++] = static_cast<int32_t>(u);
    } else if (t.leaf(nd)) {
      if (t.leaf_d2(nd, q, s.dist.data(), r.hi) == 0) continue;
      const float* f = s.dist.data();
      const int64_t m = nd.end - nd.begin;
      if (nr < cap) {
        for (int64_t i = 0; i < m; ++i) {
          if (f[i] > r.hi || (f[i] >= r.lo && t.exact_d2(q, nd.begin + i) > r.eps2)) continue;
          ++count;
          if (nr < cap) rec[nr++] = static_cast<int32_t>(nd.begin + i);
        }
      } else {
        int64_t sure = 0, maybe = 0;
        for (int64_t i = 0; i < m; ++i) {
          sure += f[i] < r.lo;
          maybe += f[i] <= r.hi;
        }
        count += sure;
        if (maybe > sure)
          for (int64_t i = 0; i < m; ++i)
            if (f[i] >= r.lo && f[i] <= r.hi) count += t.exact_d2(q, nd.begin + i) <= r.eps2;
      }
    } else {
      push_children(t, r, nd, q, stack);
      continue;
    }
    if (count >= need) break;
  }
  *n_rec = nr;
  return count;
}

// Whether node k (its box at squared distance md from q, within eps) holds a core row within eps of q.
bool any_core_within(const Tree& t, const Radius& r, const uint8_t* core, const float* q, int32_t k, float md,
                     Scratch& s) {
  const auto& nodes = t.nodes();
  auto& stack = s.inner;
  stack.clear();
  stack.push_back({k, md});
  while (!stack.empty()) {
    const int32_t m = stack.back().k;
    stack.pop_back();
    const Node& nd = nodes[m];
    if (nd.n_core == 0) continue;
    if (nd.n_core == nd.end - nd.begin && r.box_in(t.max_d2(q, m))) return true;
    if (t.leaf(nd)) {
      if (t.leaf_d2(nd, q, s.dist.data(), r.hi) == 0) continue;
      for (int64_t i = 0, len = nd.end - nd.begin; i < len; ++i)
        if (core[nd.begin + i] && r.within(t, q, nd.begin + i, s.dist[i])) return true;
    } else {
      push_children(t, r, nd, q, stack);
    }
  }
  return false;
}

// Core counts per node and a representative core row, bottom-up (children come after their parent).
void summarise_core(Tree& t, const uint8_t* core) {
  auto& nodes = t.nodes();
  for (int64_t k = static_cast<int64_t>(nodes.size()) - 1; k >= 0; --k) {
    Node& nd = nodes[k];
    if (t.leaf(nd)) {
      nd.n_core = 0;
      for (int64_t p = nd.begin; p < nd.end; ++p) {
        if (core[p]) {
          if (nd.rep < 0) nd.rep = p;
          ++nd.n_core;
        }
      }
    } else {
      const Node &l = nodes[nd.left], &r = nodes[nd.right];
      nd.n_core = l.n_core + r.n_core;
      nd.rep = l.rep >= 0 ? l.rep : r.rep;
    }
  }
}

// Marks the nodes whose core rows are all in one set (children come after their parent, so bottom-up is reverse).
void mark_same(Tree& t, const uint8_t* core, int64_t* parent) {
  auto& nodes = t.nodes();
  for (int64_t k = static_cast<int64_t>(nodes.size()) - 1; k >= 0; --k) {
    Node& nd = nodes[k];
    if (nd.n_core <= 1) {
      nd.same = true;
    } else if (t.leaf(nd)) {
      const int64_t r0 = uf_find(parent, nd.rep);
      bool all = true;
      for (int64_t u = nd.begin; u < nd.end && all; ++u) all = !core[u] || uf_find(parent, u) == r0;
      nd.same = all;
    } else {
      const Node &a = nodes[nd.left], &b = nodes[nd.right];
      nd.same =
          a.same && b.same && (a.n_core == 0 || b.n_core == 0 || uf_find(parent, a.rep) == uf_find(parent, b.rep));
    }
  }
}

// A union-find that threads share: parents are read and written atomically (relaxed: a parent pointer only ever
// moves to an ancestor, so a stale read is still an ancestor), roots are linked by compare-and-swap, the larger
// index under the smaller. Sets only merge, so "u and v had the same root" stays true.
inline int64_t shared_find(int64_t* parent, int64_t i) {
  while (true) {
    const int64_t p = __atomic_load_n(&parent[i], __ATOMIC_RELAXED);
    if (p == i) return i;
    const int64_t g = __atomic_load_n(&parent[p], __ATOMIC_RELAXED);
    if (g != p) __atomic_store_n(&parent[i], g, __ATOMIC_RELAXED);  // path halving
    i = g;
  }
}

inline int64_t shared_unite(int64_t* parent, int64_t a, int64_t b) {
  while (true) {
    a = shared_find(parent, a);
    b = shared_find(parent, b);
    if (a == b) return a;
    if (a < b) std::swap(a, b);
    int64_t expected = a;
    if (__atomic_compare_exchange_n(&parent[a], &expected, b, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) return b;
  }
}

inline bool is_same(const Node& nd) {
  return __atomic_load_n(&nd.same, __ATOMIC_RELAXED);
}
inline void set_same(Node& nd) {
  __atomic_store_n(&nd.same, true, __ATOMIC_RELAXED);
}

// Unites every core row in tree positions [b, e) with the core rows within eps. Threads may run it on disjoint
// ranges at once (the union-find and the same marks are shared through atomics).
void join_cores(Tree& t, const Radius& r, const uint8_t* core, int64_t* parent, int64_t b, int64_t e, Scratch& s) {
  auto& nodes = t.nodes();
  auto& stack = s.stack;
  for (int64_t p = b; p < e; ++p) {
    if (!core[p]) continue;
    const float* q = t.row(p);
    int64_t rp = shared_find(parent, p);
    stack.clear();
    stack.push_back({0, t.min_d2(q, 0)});
    while (!stack.empty()) {
      const Visit v = stack.back();
      stack.pop_back();
      Node& nd = nodes[v.k];
      if (nd.n_core == 0) continue;
      bool same = is_same(nd);
      if (!same && !t.leaf(nd)) {
        // Lazily: a node whose two children are each in one set, the same set, is in one set.
        const Node &a = nodes[nd.left], &c = nodes[nd.right];
        if (is_same(a) && is_same(c) &&
            (a.n_core == 0 || c.n_core == 0 || shared_find(parent, a.rep) == shared_find(parent, c.rep))) {
          set_same(nd);
          same = true;
        }
      }
      if (same) {
        if (r.box_out(v.md)) continue;
        const int64_t rk = shared_find(parent, nd.rep);
        rp = shared_find(parent, rp);
        if (rk == rp) continue;
        if (r.box_in(t.max_d2(q, v.k)) || any_core_within(t, r, core, q, v.k, v.md, s))
          rp = shared_unite(parent, rp, rk);
        continue;
      }
      if (r.box_out(v.md)) continue;
      if (t.leaf(nd)) {
        if (t.leaf_d2(nd, q, s.dist.data(), r.hi) == 0) continue;  // no row within eps: nothing to join
        for (int64_t i = 0, len = nd.end - nd.begin; i < len; ++i) {
          const int64_t u = nd.begin + i;
          if (core[u] && r.within(t, q, u, s.dist[i])) rp = shared_unite(parent, rp, u);
        }
        const int64_t r0 = shared_find(parent, nd.rep);
        bool all = true;
        for (int64_t u = nd.begin; u < nd.end && all; ++u) all = !core[u] || shared_find(parent, u) == r0;
        if (all) set_same(nd);
        continue;
      }
      push_children(t, r, nd, q, stack);
    }
  }
}

// The smallest cluster number among the core rows within eps of q (-1 when none); label[] by tree position.
int64_t border_label(const Tree& t, const Radius& r, const uint8_t* core, const int64_t* label, const float* q,
                     Scratch& s) {
  const auto& nodes = t.nodes();
  int64_t best = std::numeric_limits<int64_t>::max();
  auto& stack = s.stack;
  stack.clear();
  const float m0 = t.min_d2(q, 0);
  if (r.box_out(m0)) return -1;
  stack.push_back({0, m0});
  while (!stack.empty()) {
    const Visit v = stack.back();
    stack.pop_back();
    const Node& nd = nodes[v.k];
    if (nd.n_core == 0) continue;
    if (nd.same) {
      const int64_t lab = label[nd.rep];
      if (lab >= best) continue;
      if (r.box_in(t.max_d2(q, v.k)) || any_core_within(t, r, core, q, v.k, v.md, s)) best = lab;
      continue;
    }
    if (t.leaf(nd)) {
      if (t.leaf_d2(nd, q, s.dist.data(), r.hi) == 0) continue;
      for (int64_t i = 0, len = nd.end - nd.begin; i < len; ++i) {
        const int64_t u = nd.begin + i;
        if (core[u] && label[u] < best && r.within(t, q, u, s.dist[i])) best = label[u];
      }
      continue;
    }
    push_children(t, r, nd, q, stack);
  }
  return best == std::numeric_limits<int64_t>::max() ? -1 : best;
}

}  // namespace

int64_t dbscan_kdtree_cpu(const float* x, int64_t n, int64_t d, int64_t ld, double eps2, int64_t min_samples,
                          int64_t leaf_size, int64_t* labels, uint8_t* core_out, double* seconds) {
  PG_CHECK(n >= 0 && d >= 1 && ld >= d, "dbscan_kdtree: bad shape n=", n, " d=", d, " row stride ", ld);
  PG_CHECK(eps2 >= 0 && std::isfinite(eps2), "dbscan_kdtree: eps^2 must be finite and >= 0, got ", eps2);
  PG_CHECK(min_samples >= 1, "dbscan_kdtree: min_samples must be >= 1, got ", min_samples);
  PG_CHECK(leaf_size >= 1, "dbscan_kdtree: leaf_size must be >= 1, got ", leaf_size);
  if (seconds != nullptr) std::fill(seconds, seconds + kDbscanStages, 0.0);
  if (n == 0) return 0;
  auto clk = std::chrono::steady_clock::now();
  int stage = 0;
  auto lap = [&]() {
    const auto now = std::chrono::steady_clock::now();
    if (seconds != nullptr) seconds[stage] = std::chrono::duration<double>(now - clk).count();
    ++stage;
    clk = now;
  };
  Tree t(x, n, d, ld, leaf_size);
  lap();
  const auto& perm = t.perm();

  // 1. core rows (tree order), and up to `cap` neighbours of every row. A row that is not core has fewer than
  //    min_samples neighbours, so with min_samples <= cap its list is complete.
  std::vector<uint8_t> core(static_cast<size_t>(n));
  const Radius r(eps2, d);
  const int64_t leaf_rows = t.max_leaf();
  const int64_t cap = n <= std::numeric_limits<int32_t>::max() ? std::min<int64_t>(min_samples, kRecord) : 0;
  std::vector<int32_t> rec(static_cast<size_t>(n * cap));
  std::vector<int32_t> n_rec(static_cast<size_t>(n));
  parallel_for(n, 2048, [&](int, int64_t b, int64_t e) {
    Scratch s(leaf_rows);
    for (int64_t p = b; p < e; ++p) {
      int64_t nr = 0;
      core[p] = count_within(t, r, t.row(p), min_samples, rec.data() + p * cap, cap, &nr, s) >= min_samples;
      n_rec[p] = static_cast<int32_t>(nr);
    }
  });
  summarise_core(t, core.data());
  lap();

  // 2. clusters of core rows: first the recorded core-core pairs (a near-neighbour graph that joins most of each
  //    cluster), then the complete search, which skips the nodes already joined to the query.
  std::vector<int64_t> parent(static_cast<size_t>(n)), size(static_cast<size_t>(n), 1);
  std::iota(parent.begin(), parent.end(), int64_t{0});
  for (int64_t p = 0; p < n; ++p) {
    if (!core[p]) continue;
    for (int64_t i = 0; i < n_rec[p]; ++i) {
      const int64_t u = rec[p * cap + i];
      if (!core[u]) continue;
      uf_unite(parent.data(), size.data(), p, u);
    }
  }
  mark_same(t, core.data(), parent.data());
  lap();
  parallel_for(n, 4096, [&](int, int64_t b, int64_t e) {
    Scratch s(leaf_rows);
    join_cores(t, r, core.data(), parent.data(), b, e, s);
  });
  lap();

  // Number the sets by their smallest core row (original order).
  std::vector<int64_t> pos(static_cast<size_t>(n));
  for (int64_t p = 0; p < n; ++p) pos[perm[p]] = p;
  std::vector<int64_t> root_label(static_cast<size_t>(n), -1), label(static_cast<size_t>(n), -1);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = pos[i];
    if (!core[p]) continue;
    const int64_t r = uf_find(parent.data(), p);
    if (root_label[r] < 0) root_label[r] = count++;
    label[p] = root_label[r];
  }
  std::vector<int64_t>().swap(root_label);

  // 3. borders: from the complete neighbour lists when min_samples <= cap, else by a search.
  // (written into label: the searches read the numbers of core rows only)
  if (min_samples <= cap) {
    for (int64_t p = 0; p < n; ++p) {
      if (core[p]) continue;
      int64_t best = -1;
      for (int64_t i = 0; i < n_rec[p]; ++i) {
        const int64_t u = rec[p * cap + i];
        if (core[u] && (best < 0 || label[u] < best)) best = label[u];
      }
      label[p] = best;
    }
  } else {
    parallel_for(n, 2048, [&](int, int64_t b, int64_t e) {
      Scratch s(leaf_rows);
      for (int64_t p = b; p < e; ++p)
        if (!core[p]) label[p] = border_label(t, r, core.data(), label.data(), t.row(p), s);
    });
  }
  lap();
  for (int64_t p = 0; p < n; ++p) {
    labels[perm[p]] = label[p];
    core_out[perm[p]] = core[p];
  }
  return count;
}

}  // namespace pg
