// Building blocks of randomized SVD / top-k eigendecomposition. The drivers (method choice, iteration counts) live
// in Python; these hold no policy.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace pg {

/// out [n, n] (full, symmetric) = A^T A for A [m, n]; blocks of rows are multiplied in the compute type and summed
/// in fp64.
void gram_cpu(const MatrixView& a,  // [m, n]
              double* out);         // [n, n]

/// One fused power-iteration pass, reading A once: z [n, l] = A^T (A q). `q` is in the compute type
/// (float for fp16/bf16/fp32 input, double for fp64); z accumulates in fp64.
void power_pass_cpu(const MatrixView& a,  // [m, n]
                    const void* q,        // [n, l], compute type, C-contiguous
                    int64_t l,            //
                    double* z);           // [n, l]

/// y [m, l] = A q in the compute type, and yty [l, l] = y^T y accumulated in fp64 (same pass).
void project_cpu(const MatrixView& a,  // [m, n]
                 const void* q,        // [n, l], compute type
                 int64_t l,
                 void* y,       // [m, l], compute type
                 double* yty);  // [l, l]

/// In place: q [n, l] (row-major, n >= l) becomes an orthonormal basis of its columns (Householder QR).
void orthonormalize_cpu(double* q, int64_t n, int64_t l);

/// The k largest eigenpairs of symmetric c [d, d] (only its upper triangle is read; c is not modified):
/// w [k] descending, v [d, k] (column j is the eigenvector of w[j]).
void eigh_top_cpu(const double* c, int64_t d, int64_t k, double* w, double* v);

/// c [m, n] = a [m, k] @ b [k, n], C-contiguous. Small products run single-threaded: waking OpenBLAS's pool for
/// them costs more than they do and slows the next fused pass.
void matmul_cpu_f32(int m, int n, int k, const float* a, const float* b, float* c);
void matmul_cpu_f64(int m, int n, int k, const double* a, const double* b, double* c);

/// Deterministic standard normal samples for a seed (counter-based: the same on every platform).
void gaussian_cpu(uint64_t seed, int64_t count, double* out);

}  // namespace pg
