// Streaming per-group mean / scatter accumulation (the state behind StreamingCovariance).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace pg {

/// Accumulator state owned by the caller (numpy arrays on the host, torch tensors on the device).
/// Only the upper triangle (j >= i, row-major) of each m2 block is maintained; the caller mirrors it.
struct CovState {
  int64_t n_groups = 0;
  int64_t dim = 0;
  int64_t* count = nullptr;  // [G]
  double* mean = nullptr;    // [G, d]
  double* m2 = nullptr;      // [G, d, d], upper triangle valid
};

/// Optional fp32 staging between the chunks and the fp64 state, per group g:
///  - a row stage: the shifted rows (x − s_g) not multiplied yet, so SYRK runs on up to R rows at once however
///    small each chunk's share of the group is (a SYRK over 1.6k rows is ~35% slower per row than over 16k);
///  - a scatter stage: Σ (x − s_g)(x − s_g)ᵀ (upper) of rows multiplied but not merged, so the memory-bound d x d
///    fp64 merge runs once per ~16k rows instead of once per chunk;
///  - the shift s_g shared by both, Σ (x − s_g) over all staged rows, and the counts.
/// All null = disabled (every chunk is multiplied and merged at once).
struct CovPending {
  float* rows = nullptr;      // [G, R, d]
  int64_t rows_cap = 0;       // R
  int64_t* rows_n = nullptr;  // [G] rows in the row stage
  float* c = nullptr;         // [G, d, d] scatter stage (upper)
  float* shift = nullptr;     // [G, d]
  double* sum = nullptr;      // [G, d] Σ (x − s) over both stages
  int64_t* n = nullptr;       // [G] rows in the scatter stage
  bool enabled() const { return rows != nullptr; }
};

/// Adds the rows of `x` to the state: per group g, centres its rows (shifted by the running mean, or the group's
/// mean in this chunk when the group is new), scatter via SYRK in the compute type (fp32 for fp16/bf16/fp32, fp64 for
/// fp64), merge into the fp64 state with Chan's formula. Throws std::invalid_argument (state untouched) on group ids
/// out of range or rows with NaN/Inf. `groups` may be null (all rows in group 0).
void covariance_update_cpu(const MatrixView& x,    // [n, d]
                           const int64_t* groups,  // [n] or nullptr
                           CovState state, CovPending pending = {});

/// Merges every pending group into the state and empties the staging (no-op when disabled).
void covariance_flush_cpu(CovState state, CovPending pending);

/// Same on device memory: x, groups and the state are device pointers; work is enqueued on `stream`
/// (a cudaStream_t given as an integer); never synchronises it. Validation (ids, NaN/Inf) is the caller's.
void covariance_update_cuda(const MatrixView& x,    // [n, d] device
                            const int64_t* groups,  // [n] device, or nullptr
                            CovState state,         // device pointers
                            std::uintptr_t stream);

/// Merges state `b` into `a` (Chan's parallel formula), host memory, upper triangles.
void covariance_merge_cpu(CovState a, const CovState& b);

}  // namespace pg
