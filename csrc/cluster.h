// Density clustering kernels: a union-find over sample indices fed by FAISS range-search output (CSR), component
// numbering and border assignment. Sample indices are int64 throughout.
#pragma once

#include <cstdint>

namespace pg {

/// A disjoint-set forest over n elements, held by the caller: parent [n] (parent[i] == i at a root) and size [n]
/// (meaningful at roots). Initialise with parent[i] = i, size[i] = 1.
struct UnionFind {
  int64_t* parent;  // [n]
  int64_t* size;    // [n]
  int64_t n;
};

/// Range-search output of a block of m query rows: the neighbours of query i are ids[lims[i] : lims[i+1]]; query i
/// is sample rows[i]. ids < 0 (FAISS fills missing results with -1) are skipped.
struct NeighbourBlock {
  const int64_t* lims;  // [m + 1]
  const int64_t* ids;   // [lims[m]]
  const int64_t* rows;  // [m]
  int64_t m;
};

/// Joins every core query row with each of its core neighbours (core [n] is 0/1); union by size, path halving.
/// Returns the number of unions that merged two sets.
int64_t uf_union_block_cpu(UnionFind uf, NeighbourBlock blk, const uint8_t* core);

/// Joins the pairs edges[e][0] -- edges[e][1] (edges [n_edges, 2]); self-loops and repeats are allowed.
int64_t uf_union_edges_cpu(UnionFind uf, const int64_t* edges, int64_t n_edges);

/// Numbers the sets that contain an element of `mask` (all elements when mask is null) 0, 1, ... in the order of
/// their smallest masked member; labels[i] = the number of i's set for masked i, -1 for the others. Compresses
/// every path. Returns the number of sets.
int64_t uf_components_cpu(UnionFind uf, const uint8_t* mask, int64_t* labels);

/// For every query row r = rows[i] with out[r] < 0: out[r] = the smallest core_label[j] >= 0 over its neighbours j
/// (-1 stays when none). Neighbour ids index core_label [n_core]; rows index out [n].
void border_labels_cpu(NeighbourBlock blk, int64_t n, int64_t n_core, const int64_t* core_label, int64_t* out);

/// Exact DBSCAN of the rows of x [n, d] (float32, row stride ld elements) on a kd-tree with leaves of leaf_size
/// rows: a row is core when at least min_samples rows (itself included) lie within squared distance eps2 (float64
/// arithmetic, <= eps2); clusters are numbered 0, 1, ... by their smallest core row; a border row takes the
/// smallest cluster number among its core neighbours (scikit-learn's DBSCAN partition); labels [n] (-1 = noise),
/// core [n] 0/1. Returns the number of clusters. Meant for low d (a kd-tree prunes poorly beyond ~20 dimensions).
/// seconds (may be null) receives the wall time of its kDbscanStages stages: tree, core rows, joins from the
/// neighbours recorded in the core pass, the complete join search, borders.
constexpr int kDbscanStages = 5;
int64_t dbscan_kdtree_cpu(const float* x, int64_t n, int64_t d, int64_t ld, double eps2, int64_t min_samples,
                          int64_t leaf_size, int64_t* labels, uint8_t* core, double* seconds);

}  // namespace pg
