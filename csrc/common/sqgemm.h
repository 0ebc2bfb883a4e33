// A small-K GEMM for the book-keeping form of per-sample gradient norms: one sample's gradient block
// M = S · V (S [rows, t] with any strides, V [t, cols] row-major) is formed in registers, its squares are summed and
// it is added into an accumulator, so M is never stored. x86-64 with AVX-512 or AVX2 + FMA (chosen at run time);
// callers fall back to BLAS without either.
#pragma once

#include <cstdint>

namespace pg {

/// The instruction sets sqgemm_accumulate has a kernel for; none = no kernel (callers use BLAS).
enum class SqgemmIsa : int { none = 0, avx2 = 1, avx512 = 2 };

/// "none", "avx2" or "avx512".
const char* sqgemm_isa_name(SqgemmIsa isa);

/// The best ISA this CPU supports: avx512 (AVX-512 F and DQ), else avx2 (AVX2 and FMA), else none (and none on
/// other architectures).
SqgemmIsa sqgemm_best_isa();

/// The ISA used until one is set: avx512 where the CPU has it, else none (per-sample BLAS). The AVX2 kernel is
/// opt-in (sqgemm_set_isa) until it is measured on CPUs without AVX-512.
SqgemmIsa sqgemm_default_isa();

/// The ISA in use (sqgemm_default_isa() until set).
SqgemmIsa sqgemm_isa();

/// Sets the ISA in use (e.g. none, for tests of the BLAS fallback, or avx2 on an AVX-512 CPU); returns the previous
/// one. Throws std::invalid_argument, naming it, if the CPU lacks it.
SqgemmIsa sqgemm_set_isa(SqgemmIsa isa);

/// Whether callers should use sqgemm_accumulate: sqgemm_isa() != none.
bool sqgemm_available();

/// M[r, c] = Σ_k s[r·s_r + k·s_k] · v[k·ldv + c] for r < rows, c < cols (float32 sums over k, as a GEMM);
/// acc[r·ld_acc + c] += M[r, c]; returns Σ M[r, c]² (squares summed in float32 over at most 24 entries, then in
/// float64). By the kernel of sqgemm_isa(); throws std::logic_error when that is none.
double sqgemm_accumulate(int64_t rows, int64_t cols, int64_t k, const float* s, int64_t s_r, int64_t s_k,
                         const float* v, int64_t ldv, float* acc, int64_t ld_acc);

/// The same by the kernel of `isa` (for callers that read sqgemm_isa() once for many calls); throws
/// std::logic_error when isa is none or the CPU lacks it.
double sqgemm_accumulate(SqgemmIsa isa, int64_t rows, int64_t cols, int64_t k, const float* s, int64_t s_r, int64_t s_k,
                         const float* v, int64_t ldv, float* acc, int64_t ld_acc);

}  // namespace pg
