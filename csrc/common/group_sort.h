// Rows of a chunk ordered by class: the first step of every per-class kernel.
#pragma once

#include <cstdint>
#include <vector>

#include "common/check.h"

namespace pg {

/// A stable counting sort of row indices by class id: rows of class g are perm[offset[g] .. offset[g + 1]), in
/// their original order; group_of[p] is the class of sorted position p.
struct GroupOrder {
  std::vector<int64_t> offset;    // [G + 1]
  std::vector<int64_t> perm;      // [n]
  std::vector<int64_t> group_of;  // [n]

  /// `groups` may be null (every row in class 0). Throws std::invalid_argument naming the first id out of range.
  GroupOrder(const int64_t* groups, int64_t n, int64_t n_groups) : offset(n_groups + 1, 0), perm(n), group_of(n) {
    for (int64_t r = 0; r < n; ++r) {
      const int64_t g = groups ? groups[r] : 0;
      PG_CHECK(g >= 0 && g < n_groups, "group id ", g, " at row ", r, " is outside [0, ", n_groups, ")");
      ++offset[g + 1];
    }
    for (int64_t g = 0; g < n_groups; ++g) offset[g + 1] += offset[g];
    std::vector<int64_t> next(offset.begin(), offset.end() - 1);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t g = groups ? groups[r] : 0;
      group_of[next[g]] = g;
      perm[next[g]++] = r;
    }
  }
};

}  // namespace pg
