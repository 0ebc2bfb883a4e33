// A small-K GEMM for the book-keeping form of per-sample gradient norms: one sample's gradient block
// M = S · V (S [rows, t] with any strides, V [t, cols] row-major) is formed in registers, its squares are summed and
// it is added into an accumulator, so M is never stored. AVX-512 only; callers fall back to BLAS without it.
#pragma once

#include <cstdint>

namespace pg {

/// Whether the CPU supports sqgemm_accumulate (x86-64 with AVX-512 F and DQ).
bool sqgemm_supported();

/// Whether callers should use sqgemm_accumulate: supported and not switched off (sqgemm_set_enabled, for tests that
/// run the BLAS fallback on an AVX-512 machine). Returns the previous setting.
bool sqgemm_available();
bool sqgemm_set_enabled(bool enabled);

/// M[r, c] = Σ_k s[r·s_r + k·s_k] · v[k·ldv + c] for r < rows, c < cols (float32 sums over k, as a GEMM);
/// acc[r·ld_acc + c] += M[r, c]; returns Σ M[r, c]² (squares summed in float32 over at most 24 entries, then in
/// float64). Requires sqgemm_supported(); throws std::logic_error otherwise.
double sqgemm_accumulate(int64_t rows, int64_t cols, int64_t k, const float* s, int64_t s_r, int64_t s_k,
                         const float* v, int64_t ldv, float* acc, int64_t ld_acc);

}  // namespace pg
