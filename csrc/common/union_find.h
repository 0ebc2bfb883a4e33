// A disjoint-set forest over int64 indices held by the caller: parent [n] (parent[i] == i at a root), size [n]
// (meaningful at roots). Used by the cluster kernels.
#pragma once

#include <cstdint>
#include <utility>

namespace pg {

/// The root of i's set; halves the path on the way.
inline int64_t uf_find(int64_t* parent, int64_t i) {
  while (parent[i] != i) {
    parent[i] = parent[parent[i]];
    i = parent[i];
  }
  return i;
}

/// Joins the sets of a and b: union by size, equal sizes keep the smaller index as root (so the forest does not
/// depend on the order of an edge's ends). Returns whether the two were apart.
inline bool uf_unite(int64_t* parent, int64_t* size, int64_t a, int64_t b) {
  a = uf_find(parent, a);
  b = uf_find(parent, b);
  if (a == b) return false;
  if (size[a] < size[b] || (size[a] == size[b] && b < a)) std::swap(a, b);
  parent[b] = a;
  size[a] += size[b];
  return true;
}

}  // namespace pg
