// Fused centre-project-score: the second pass of spectral signatures and SPECTRE.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace pg {

/// For each row r of x with class g = groups[r]: p = (x_r − μ_g) V_g (centred in fp64, multiplied in the compute
/// type), score_r = |p|², and, when `que` is given, que_r = p M_g pᵀ. Rows are grouped by class internally (no copy
/// of x beyond one block per thread). `proj` may be null when the projections are not wanted.
void project_scores_cpu(const MatrixView& x,    // [n, d]
                        const int64_t* groups,  // [n] or nullptr (all rows in class 0)
                        int64_t n_groups,       //
                        const double* means,    // [G, d]
                        const void* dirs,       // [G, d, k], compute type (float32, or float64 for fp64 input)
                        int64_t k,              //
                        void* proj,             // [n, k], compute type, or nullptr
                        double* score,          // [n]
                        const double* que,      // [G, k, k] or nullptr
                        double* que_score);     // [n] or nullptr

}  // namespace pg
