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

/// Optional fp32 staging between the chunks and the fp64 state: per group, the scatter Σ (x − s)(x − s)ᵀ of rows not
/// merged yet (upper triangle), their shift s, Σ (x − s) and count. Consecutive chunks of a group accumulate here
/// with SYRK (beta = 1) and are merged once per ~16k rows instead of once per chunk. All null = disabled.
struct CovPending {
  float* c = nullptr;      // [G, d, d]
  float* shift = nullptr;  // [G, d]
  double* sum = nullptr;   // [G, d]
  int64_t* n = nullptr;    // [G]
  bool enabled() const { return c != nullptr; }
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
