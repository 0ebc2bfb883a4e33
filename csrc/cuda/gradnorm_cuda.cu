// CUDA kernels of the gradnorm op, the device twin of csrc/cpu/gradnorm_cpu.cpp (same math):
//
//   ghost:  one block per sample; its threads share the pairs t <= t' of the upper triangle, each pair giving
//           (a_t·a_t')(g_t·g_t') (dot products in the compute type, the product and the sums in float64), weight 2
//           off the diagonal;
//   direct: one block per sample; its threads share the entries (o, i) of M = Gᵀ A, each entry summed over t in the
//           compute type and squared into a float64 sum — nothing of M is stored;
//   bias:   one block per sample; per output column the float64 sum over t, squared.
//
// Block sums are fixed-shape tree reductions and every thread's loop has a fixed order, so the results are bitwise
// reproducible (no atomics). Inputs are read through their strides in any of the four dtypes. These kernels are
// simple and memory-bound (every product reads global memory through the cache); the CPU path carries the tuned
// BLAS forms.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/check.h"
#include "common/dtype.h"
#include "cuda/cuda_check.h"
#include "gradnorm.h"

namespace pg {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535;

__device__ __forceinline__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

template <typename Tag>
__device__ __forceinline__ typename Tag::compute elem(const BatchView& v, int64_t b, int64_t r, int64_t c) {
  using S = typename Tag::storage;
  return load(Tag{}, v.at<S>(b, r) + c * v.col_stride);
}

template <typename Tag>
__device__ typename Tag::compute row_dot(const BatchView& v, int64_t b, int64_t r0, int64_t r1) {
  using C = typename Tag::compute;
  using S = typename Tag::storage;
  const S* p0 = v.at<S>(b, r0);
  const S* p1 = v.at<S>(b, r1);
  C s = C(0);
  for (int64_t c = 0; c < v.cols; ++c) s += load(Tag{}, p0 + c * v.col_stride) * load(Tag{}, p1 + c * v.col_stride);
  return s;
}

template <typename Tag>
__global__ void gradnorm_ghost_kernel(BatchView a,  // [B, T, d_in]
                                      BatchView g,  // [B, T, d_out]
                                      double* out) {
  __shared__ double shared[kThreads];
  const int64_t t = a.rows;
  const int64_t pairs = t * t;
  for (int64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    double acc = 0;
    for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
      const int64_t i = p / t, j = p % t;
      if (j < i) continue;
      const double ka = static_cast<double>(row_dot<Tag>(a, b, i, j));
      const double kg = static_cast<double>(row_dot<Tag>(g, b, i, j));
      acc += (i == j ? 1.0 : 2.0) * ka * kg;
    }
    const double total = block_sum(acc, shared);
    if (threadIdx.x == 0) out[b] = total;
  }
}

template <typename Tag>
__global__ void gradnorm_direct_kernel(BatchView a,  // [B, T, d_in]
                                       BatchView g,  // [B, T, d_out]
                                       double* out) {
  using C = typename Tag::compute;
  __shared__ double shared[kThreads];
  const int64_t entries = g.cols * a.cols;
  for (int64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    double acc = 0;
    // consecutive threads take consecutive input columns i of one output row o (coalesced reads of a row of A)
    for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
      const int64_t o = e / a.cols, i = e % a.cols;
      C m = C(0);
      for (int64_t r = 0; r < a.rows; ++r) m += elem<Tag>(g, b, r, o) * elem<Tag>(a, b, r, i);
      acc += static_cast<double>(m) * static_cast<double>(m);
    }
    const double total = block_sum(acc, shared);
    if (threadIdx.x == 0) out[b] = total;
  }
}

template <typename Tag>
__global__ void gradnorm_bias_kernel(BatchView g,  // [B, T, d_out]
                                     double* out) {
  __shared__ double shared[kThreads];
  for (int64_t b = blockIdx.x; b < g.batch; b += gridDim.x) {
    double acc = 0;
    for (int64_t o = threadIdx.x; o < g.cols; o += blockDim.x) {
      double col = 0;
      for (int64_t r = 0; r < g.rows; ++r) col += static_cast<double>(elem<Tag>(g, b, r, o));
      acc += col * col;
    }
    const double total = block_sum(acc, shared);
    if (threadIdx.x == 0) out[b] = total;
  }
}

template <typename Tag>
void launch_gradnorm(const BatchView& a, const BatchView& g, GradNormMethod method, double* weight_sq, double* bias_sq,
                     cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::clamp<int64_t>(a.batch, 1, kMaxGrid));
  if (a.rows == 0 || a.cols == 0 || g.cols == 0) {
    PG_CUDA_CHECK(cudaMemsetAsync(weight_sq, 0, sizeof(double) * a.batch, stream));
  } else if (method == GradNormMethod::ghost) {
    gradnorm_ghost_kernel<Tag><<<grid, kThreads, 0, stream>>>(a, g, weight_sq);
    PG_CUDA_CHECK_LAUNCH();
  } else {
    gradnorm_direct_kernel<Tag><<<grid, kThreads, 0, stream>>>(a, g, weight_sq);
    PG_CUDA_CHECK_LAUNCH();
  }
  if (bias_sq != nullptr) {
    gradnorm_bias_kernel<Tag><<<grid, kThreads, 0, stream>>>(g, bias_sq);
    PG_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

void gradnorm_linear_cuda(const BatchView& a, const BatchView& g, GradNormMethod method, double* weight_sq,
                          double* bias_sq, std::uintptr_t stream) {
  PG_CHECK(a.batch == g.batch && a.rows == g.rows, "a [B, T, d_in] and g [B, T, d_out] must agree in B and T");
  PG_CHECK_TYPE(a.dtype == g.dtype, "a and g must have the same dtype, got ", dtype_name(a.dtype), " and ",
                dtype_name(g.dtype));
  if (a.batch == 0) return;
  PG_CHECK(weight_sq != nullptr, "weight_sq must be a device pointer");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(a.dtype, [&](auto tag) { launch_gradnorm<decltype(tag)>(a, g, method, weight_sq, bias_sq, s); });
}

}  // namespace pg
