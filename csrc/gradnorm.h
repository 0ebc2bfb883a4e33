// Per-sample gradient norms of a linear map without per-sample gradients.
//
// For a linear map applied at T positions of each sample (a plain Linear has T = 1; a sequence model or an unfolded
// convolution has T > 1), with inputs A_b [T, d_in] and output gradients G_b [T, d_out], the gradient of the weight
// from sample b is M_b = G_bᵀ A_b [d_out, d_in]. The kernels return ‖M_b‖_F² without ever storing M for the batch:
//
//   ghost:  ‖M_b‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t') = ⟨A_b A_bᵀ, G_b G_bᵀ⟩_F   (two T x T Grams per sample)
//   direct: ‖M_b‖² from M_b built tile by tile (d_out rows at a time) and squared.
//
// and, optionally, the bias term ‖Σ_t g_t‖².
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace pg {

/// A strided 3-D view [batch, rows, cols] of a host or device array, strides in elements.
struct BatchView {
  const void* data = nullptr;  // [batch, rows, cols]
  int64_t batch = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t batch_stride = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 1;
  DType dtype = DType::float32;

  template <typename S>
  PG_HD const S* at(int64_t b, int64_t r) const {
    return static_cast<const S*>(data) + b * batch_stride + r * row_stride;
  }
};

/// The two forms of the per-sample norm.
enum class GradNormMethod : int { ghost = 0, direct = 1 };

/// Estimated multiply-adds of each form for one sample (the cost model behind method "auto"):
///   ghost  ≈ T²/2 · (d_in + d_out) + T²   (two SYRKs, upper triangles, and their inner product)
///   direct ≈ T · d_in · d_out + d_in · d_out   (one GEMM and the squared sum)
/// The ghost form is chosen when it is cheaper, its estimate weighted by kGhostWeight: two SYRKs and an elementwise
/// inner product run at a lower rate than the direct form's single GEMM (measured on the 2-layer transformer's square
/// 128 x 128 maps at T = 128, where the unweighted estimates tie: direct 4-23% faster). The choice also keeps the
/// ghost form's T² workspace below the d_in·d_out of the direct form's gradient whenever T is at most about the
/// harmonic mean of d_in and d_out.
constexpr double kGhostWeight = 1.15;
inline GradNormMethod choose_gradnorm_method(int64_t t, int64_t d_in, int64_t d_out) {
  const double tt = static_cast<double>(t) * static_cast<double>(t);
  const double ghost = kGhostWeight * (tt * 0.5 * static_cast<double>(d_in + d_out) + tt);
  const double direct = (static_cast<double>(t) + 1.0) * static_cast<double>(d_in) * static_cast<double>(d_out);
  return ghost <= direct ? GradNormMethod::ghost : GradNormMethod::direct;
}

/// Per-sample squared Frobenius norms of G_bᵀ A_b into weight_sq [B] (float64), and, when bias_sq is not null, the
/// squared norms of Σ_t g_t into bias_sq [B]. a [B, T, d_in] and g [B, T, d_out] share one dtype (any of the four;
/// products in float32 for the narrow types and float32, float64 for float64; the final sums in float64).
/// Samples run in parallel over threads, each with single-threaded BLAS.
void gradnorm_linear_cpu(const BatchView& a,  // [B, T, d_in]
                         const BatchView& g,  // [B, T, d_out]
                         GradNormMethod method,
                         double* weight_sq,  // [B]
                         double* bias_sq);   // [B] or nullptr

/// Same on device memory, enqueued on `stream` (a cudaStream_t as an integer); never synchronises.
void gradnorm_linear_cuda(const BatchView& a,  // [B, T, d_in] device
                          const BatchView& g,  // [B, T, d_out] device
                          GradNormMethod method,
                          double* weight_sq,  // [B] device
                          double* bias_sq,    // [B] device or nullptr
                          std::uintptr_t stream);

}  // namespace pg
