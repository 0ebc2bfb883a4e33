// CPU kernels of the cluster op: union-find over range-search neighbourhoods, component numbering, borders.
//
// One thread: a block's unions touch parents all over [0, n), so threads would need atomics (CAS on parents) for a
// step that costs well under the FAISS search producing the block (measured in bench/bench_density.py).
#include <algorithm>
#include <vector>

#include "cluster.h"
#include "common/check.h"
#include "common/union_find.h"

namespace pg {
namespace {

void check_block(const NeighbourBlock& blk, int64_t n, int64_t n_ids) {
  PG_CHECK(blk.m >= 0, "negative block size ", blk.m);
  PG_CHECK(blk.lims[0] == 0, "lims[0] must be 0, got ", blk.lims[0]);
  for (int64_t i = 0; i < blk.m; ++i) {
    PG_CHECK(blk.lims[i + 1] >= blk.lims[i], "lims must be non-decreasing (at ", i, ")");
    PG_CHECK(blk.rows[i] >= 0 && blk.rows[i] < n, "rows[", i, "] = ", blk.rows[i], " is outside [0, ", n, ")");
  }
  const int64_t nnz = blk.lims[blk.m];
  for (int64_t k = 0; k < nnz; ++k) PG_CHECK(blk.ids[k] < n, "ids[", k, "] = ", blk.ids[k], " is outside [0, ", n, ")");
}

}  // namespace

int64_t uf_union_block_cpu(UnionFind uf, NeighbourBlock blk, const uint8_t* core) {
  check_block(blk, uf.n, uf.n);
  int64_t merged = 0;
  for (int64_t i = 0; i < blk.m; ++i) {
    const int64_t r = blk.rows[i];
    if (!core[r]) continue;
    for (int64_t k = blk.lims[i]; k < blk.lims[i + 1]; ++k) {
      const int64_t j = blk.ids[k];
      if (j >= 0 && j != r && core[j]) merged += uf_unite(uf.parent, uf.size, r, j);
    }
  }
  return merged;
}

int64_t uf_union_edges_cpu(UnionFind uf, const int64_t* edges, int64_t n_edges) {
  for (int64_t e = 0; e < n_edges; ++e) {
    const int64_t a = edges[2 * e], b = edges[2 * e + 1];
    PG_CHECK(a >= 0 && a < uf.n && b >= 0 && b < uf.n, "edge ", e, " = (", a, ", ", b, ") is outside [0, ", uf.n, ")");
  }
  int64_t merged = 0;
  for (int64_t e = 0; e < n_edges; ++e) merged += uf_unite(uf.parent, uf.size, edges[2 * e], edges[2 * e + 1]);
  return merged;
}

int64_t uf_components_cpu(UnionFind uf, const uint8_t* mask, int64_t* labels) {
  std::vector<int64_t> root_label(static_cast<size_t>(uf.n), -1);
  int64_t count = 0;
  for (int64_t i = 0; i < uf.n; ++i) {
    const int64_t r = uf_find(uf.parent, i);
    uf.parent[i] = r;
    if (mask != nullptr && !mask[i]) {
      labels[i] = -1;
      continue;
    }
    if (root_label[r] < 0) root_label[r] = count++;
    labels[i] = root_label[r];
  }
  return count;
}

void border_labels_cpu(NeighbourBlock blk, int64_t n, int64_t n_core, const int64_t* core_label, int64_t* out) {
  check_block(blk, n, n_core);
  for (int64_t i = 0; i < blk.m; ++i) {
    const int64_t r = blk.rows[i];
    if (out[r] >= 0) continue;
    int64_t best = -1;
    for (int64_t k = blk.lims[i]; k < blk.lims[i + 1]; ++k) {
      const int64_t j = blk.ids[k];
      if (j < 0) continue;
      const int64_t c = core_label[j];
      if (c >= 0 && (best < 0 || c < best)) best = c;
    }
    out[r] = best;
  }
}

}  // namespace pg
