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

/// The same choice when the direct form runs as book-keeping (gradnorm_*_bk_cpu): the per-sample gradients it builds
/// also give the layer's weight gradient, which the caller then does not compute, so the direct form's extra cost is
/// only that of squaring and summing them, ≈ kBookkeepingCost · d_in · d_out per sample in the multiply-add units of
/// the ghost estimate (measured: 2.3-3.2 for d = 128...512, T = 16...128, float32), against the ghost form's
/// kGhostWeight · (T²/2 · (d_in + d_out) + T²) on top of the weight gradient. For T = 1 the ghost form (‖a‖²‖g‖²)
/// always wins; for square maps the switch is at T ≈ √(2.6·d) (T ≈ 18 for d = 128, 52 for d = 1024).
constexpr double kBookkeepingCost = 3.0;
inline GradNormMethod choose_gradnorm_method_bk(int64_t t, int64_t d_in, int64_t d_out) {
  const double tt = static_cast<double>(t) * static_cast<double>(t);
  const double ghost = kGhostWeight * (tt * 0.5 * static_cast<double>(d_in + d_out) + tt);
  const double direct = kBookkeepingCost * static_cast<double>(d_in) * static_cast<double>(d_out);
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

/// A batch-first [B, C, H, W] strided input of a 2-D convolution (a Conv1d input is [B, C, 1, W]) with the geometry of
/// the convolution. Sample b's "unfolded" input A_b [L = out_h·out_w, C/groups·kh·kw] per group of channels (the
/// columns ordered channel, kernel row, kernel column, as the weight [C_out, C/groups, kh, kw]) is packed per sample
/// inside the kernels and never stored for the batch. Zero padding: pad_h rows above and pad_w columns left of the
/// input; rows and columns past its end read as zeros too (the far padding follows from out_h and out_w).
struct ConvInputView {
  const void* data = nullptr;
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  int64_t batch_stride = 0, channel_stride = 0, row_stride = 0, col_stride = 1;
  DType dtype = DType::float32;
  int64_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, dilation_h = 1, dilation_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t out_h = 0, out_w = 0, groups = 1;
};

/// Book-keeping form of the direct method: each sample's weight gradient M_b = G_bᵀ A_b is built tile by tile as in
/// the direct form, squared into weight_sq [B] (float64) AND summed over the batch into grad_weight [d_out, d_in]
/// (contiguous, the compute type: float32 for float16/bfloat16/float32 input, float64 for float64), which is the
/// layer's weight gradient Σ_b G_bᵀ A_b, so that the caller need not compute it again. bias_sq as above (or null);
/// grad_bias (or null) receives the bias gradient Σ_b Σ_t g_t [d_out] in the compute type (summed in float64).
/// The sum over samples runs in a per-thread accumulator per range of samples, the ranges added in order at the end.
void gradnorm_linear_bk_cpu(const BatchView& a,          // [B, T, d_in]
                            const BatchView& g,          // [B, T, d_out]
                            double* weight_sq,           // [B]
                            double* bias_sq,             // [B] or nullptr
                            void* grad_weight,           // [d_out, d_in]
                            void* grad_bias = nullptr);  // [d_out] or nullptr

/// Same for a convolution: x its input (with its geometry), g the output gradient [B, L, C_out] (any strides; a
/// contiguous [B, C_out, L] seen transposed), grad_weight [C_out, C/groups·kh·kw] in the compute type.
void gradnorm_conv_bk_cpu(const ConvInputView& x, const BatchView& g, double* weight_sq, double* bias_sq,
                          void* grad_weight, void* grad_bias = nullptr);

/// Per-sample affine gradients of a LayerNorm over the last N features: x its input and g its output gradient, both
/// [B, T, N] (any strides, one dtype), mean and rstd [B·T] contiguous in the compute type (what
/// torch.native_layer_norm returns). For sample b, ‖Σ_t g_t ⊙ x̂_t‖² into weight_sq and ‖Σ_t g_t‖² into bias_sq
/// (x̂_t = (x_t − mean_t)·rstd_t), and their sums over the batch into grad_weight / grad_bias [N] (compute type), the
/// layer's affine gradients; any output may be null.
void gradnorm_layernorm_cpu(const BatchView& x, const BatchView& g, const void* mean, const void* rstd,
                            double* weight_sq, double* bias_sq, void* grad_weight, void* grad_bias);

/// Per-sample squared norms of an Embedding's weight gradient: idx [B, T] contiguous token ids, g [B, T, N] the output
/// gradient; the rows of one id within a sample are summed before squaring; ids equal to padding_idx (−1: none) are
/// skipped. out [B] float64.
void gradnorm_embedding_cpu(const int64_t* idx, const BatchView& g, int64_t padding_idx, double* out);

/// Same on device memory, enqueued on `stream` (a cudaStream_t as an integer); never synchronises.
void gradnorm_linear_cuda(const BatchView& a,  // [B, T, d_in] device
                          const BatchView& g,  // [B, T, d_out] device
                          GradNormMethod method,
                          double* weight_sq,  // [B] device
                          double* bias_sq,    // [B] device or nullptr
                          std::uintptr_t stream);

}  // namespace pg
