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

/// Device version of project_scores_cpu: every pointer is a CUDA device pointer (x strided in elements), the work
/// is queued on `stream` (a cudaStream_t) and nothing waits for it. k ≤ 256.
void project_scores_cuda(const MatrixView& x, const int64_t* groups, int64_t n_groups, const double* means,
                         const void* dirs, int64_t k, void* proj, double* score, const double* que, double* que_score,
                         std::uintptr_t stream);

/// One class-segmented, shifted pass of subspace iteration, reading x once. For each row r of class g = groups[r]:
/// u = x_r − shift_g (in fp64, stored in the compute type); then, per class, z_g += Uᵀ (U Q_g) with U the class's
/// rows u (blocks multiplied in the compute type, summed in fp64), sums_g += Σ u (fp64) and counts_g += n_g.
/// Accumulates into z, sums and counts (the caller zeroes them before the first chunk of a pass).
void segmented_power_pass_cpu(const MatrixView& x,    // [n, d]
                              const int64_t* groups,  // [n] or nullptr (all rows in class 0)
                              int64_t n_groups,       //
                              const double* shift,    // [G, d]
                              const void* q,          // [G, d, l], compute type
                              int64_t l,              //
                              double* z,              // [G, d, l]
                              double* sums,           // [G, d]
                              int64_t* counts);       // [G]

}  // namespace pg
