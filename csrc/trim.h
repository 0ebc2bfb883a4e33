// Fused trimmed cross-entropy: per-row log-sum-exp and loss, selection of the k smallest losses among the valid
// rows (no full sort on the host), and the backward (softmax − one-hot on kept rows, zero elsewhere) written
// straight into the gradient.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtype.h"

namespace pg {

/// A strided view of logits [batch, classes, positions] (positions = 1 for [B, C] input). Row r of the loss is
/// (b, p) = (r / positions, r % positions); its class j lives at data + b·stride_b + j·stride_c + p·stride_p.
/// Strides are in elements and may be 0 or negative. The same struct describes the gradient (mutable).
struct LogitsView {
  const void* data = nullptr;  // [batch, classes, positions]
  int64_t batch = 0;
  int64_t classes = 0;
  int64_t positions = 1;
  int64_t stride_b = 0;
  int64_t stride_c = 1;
  int64_t stride_p = 0;
  DType dtype = DType::float32;

  PG_HD int64_t rows() const { return batch * positions; }
  PG_HD int64_t row_offset(int64_t r) const {
    if (positions == 1) return r * stride_b;
    return (r / positions) * stride_b + (r % positions) * stride_p;
  }
};

/// Per-row results of the forward pass, written by the kernels (host or device memory, caller-allocated).
struct TrimRows {
  double* loss = nullptr;     // [n] cross-entropy of each row; 0 for ignored rows
  double* row_max = nullptr;  // [n] max logit of each row (exact in the input precision)
  double* log_sum = nullptr;  // [n] log Σ exp(x − row_max); loss = row_max + log_sum − x[target]
  uint8_t* keep = nullptr;    // [n] 1 for the k kept rows, 0 elsewhere (ignored rows included)
};

/// Rows whose target equals ignore_index are excluded before trimming; of the n_valid other rows the k with the
/// smallest loss are kept, ties broken by the lower row index. Throws std::invalid_argument (ValueError) for a
/// target outside [0, classes) that is not ignore_index, for k outside [min(1, n_valid), n_valid], and for a valid
/// row whose logits hold NaN or +inf or no finite value (its log-sum-exp is not finite). Returns the sum of the kept
/// losses (float64, added in row order). Accepts float32 and float64 logits.
/// With `eager_grad` (optional, see trimmed_cross_entropy_eager_available) the row pass also writes into it the
/// gradient for a unit upstream gradient, (softmax − onehot) · eager_factor on the kept rows and 0 on the others,
/// each row while it is still in cache: no second read of the logits and no second exp; the backward pass is then
/// nothing for an upstream gradient of 1, else one scaling pass (trimmed_cross_entropy_backward_eager_cpu).
double trimmed_cross_entropy_forward_cpu(const LogitsView& logits,  // [B, C, P]
                                         const int64_t* target,     // [B·P]
                                         int64_t ignore_index, int64_t k, TrimRows rows,
                                         const LogitsView* eager_grad = nullptr,  // [B, C, P] or null
                                         double eager_factor = 1.0);

/// Whether the forward pass can fill `grad` eagerly (float32 logits and gradient with unit class stride, more than 16
/// classes, AVX2 build).
bool trimmed_cross_entropy_eager_available(const LogitsView& logits, const LogitsView& grad);

/// Scales an eagerly written gradient in place: kept rows times factor · scale[r · scale_stride] (nothing to do when
/// that is one value equal to 1).
void trimmed_cross_entropy_backward_eager_cpu(const TrimRows& rows,  // keep read
                                              const double* scale, int64_t scale_stride, double factor,
                                              const LogitsView& grad);  // [B, C, P] float32, in place

/// grad[r, j] = (softmax(x_r)_j − [j == target_r]) · factor · scale[r · scale_stride] on kept rows, 0 elsewhere.
/// `scale` is the upstream gradient (one value with scale_stride 0, or one per row with scale_stride 1), `factor`
/// the reduction's constant (1/k for "mean", 1 otherwise). `grad` has the logits' shape and dtype, any strides.
void trimmed_cross_entropy_backward_cpu(const LogitsView& logits,  // [B, C, P]
                                        const int64_t* target,     // [B·P]
                                        const TrimRows& rows,      // row_max, log_sum, keep read
                                        const double* scale, int64_t scale_stride, double factor,
                                        const LogitsView& grad);  // [B, C, P] written

/// Device twins: every pointer is CUDA device memory, work is enqueued on `stream` (a cudaStream_t as an integer),
/// never synchronised. Targets must have been validated by the caller (no error can be raised from the device).
/// Accepts float16, bfloat16, float32 and float64 logits. `total` [1] receives the sum of the kept losses (float64,
/// a fixed-order reduction: bitwise reproducible).
void trimmed_cross_entropy_forward_cuda(const LogitsView& logits,  // [B, C, P] device
                                        const int64_t* target,     // [B·P] device
                                        int64_t ignore_index, int64_t k, TrimRows rows, double* total,
                                        std::uintptr_t stream);

void trimmed_cross_entropy_backward_cuda(const LogitsView& logits, const int64_t* target, const TrimRows& rows,
                                         const double* scale, int64_t scale_stride, double factor,
                                         const LogitsView& grad, std::uintptr_t stream);

}  // namespace pg
