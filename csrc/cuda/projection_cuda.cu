// Fused centre-project-score on CUDA, the device twin of csrc/cpu/projection_cpu.cpp (same math):
//
//   one warp per row r of class g: the lanes stride over the d columns, centre each element in fp64
//   (x − μ_g), convert to the compute type and accumulate its products with the class's directions V_g [d, k]
//   for a tile of kOutTile outputs at a time (the row is re-read per tile, from L1/L2); warp shuffles reduce each
//   output in a fixed order. Lane 0 writes the projection, the score |p|² (fp64) and, with a QUE matrix, pᵀ M_g p.
//
// Sums run in a fixed order (no atomics), so results are reproducible. Rows are independent: no sort is needed, and
// nothing waits on the host.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/check.h"
#include "common/dtype.h"
#include "cuda/cuda_check.h"
#include "projection.h"

namespace pg {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kOutTile = 8;  // outputs accumulated per sweep over the row
constexpr int kMaxK = 256;   // projections kept per row in shared memory for the score and QUE
constexpr int64_t kMaxGrid = int64_t{1} << 20;

template <typename C>
__device__ __forceinline__ C warp_sum(C v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename Tag>
__global__ void project_kernel(const typename Tag::storage* __restrict__ x, int64_t n, int64_t d, int64_t rs,
                               int64_t cs, const int64_t* __restrict__ groups, const double* __restrict__ means,
                               const typename Tag::compute* __restrict__ dirs, int64_t k,
                               typename Tag::compute* __restrict__ proj, double* __restrict__ score,
                               const double* __restrict__ que, double* __restrict__ que_score) {
  using C = typename Tag::compute;
  __shared__ C p_shared[kWarpsPerBlock][kMaxK];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  C* p = p_shared[warp];
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; r < n;
       r += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t g = groups ? groups[r] : 0;
    const typename Tag::storage* row = x + r * rs;
    const double* mu = means + g * d;
    const C* v = dirs + g * d * k;
    for (int64_t o0 = 0; o0 < k; o0 += kOutTile) {
      const int nt = static_cast<int>(k - o0 < kOutTile ? k - o0 : kOutTile);
      C acc[kOutTile];
#pragma unroll
      for (int t = 0; t < kOutTile; ++t) acc[t] = C(0);
      for (int64_t j = lane; j < d; j += kWarp) {
        const C u = static_cast<C>(static_cast<double>(load(Tag{}, row + j * cs)) - mu[j]);
        const C* vj = v + j * k + o0;
#pragma unroll
        for (int t = 0; t < kOutTile; ++t)
          if (t < nt) acc[t] += u * vj[t];
      }
#pragma unroll
      for (int t = 0; t < kOutTile; ++t) {
        const C s = warp_sum(acc[t]);
        if (lane == 0 && t < nt) p[o0 + t] = s;
      }
    }
    __syncwarp();
    if (lane == 0) {
      double s = 0;
      for (int64_t i = 0; i < k; ++i) {
        const double pi = static_cast<double>(p[i]);
        s += pi * pi;
        if (proj) proj[r * k + i] = p[i];
      }
      score[r] = s;
      if (que) {
        const double* m = que + g * k * k;
        double q = 0;
        for (int64_t i = 0; i < k; ++i) {
          double rowsum = 0;
          for (int64_t j = 0; j < k; ++j) rowsum += m[i * k + j] * static_cast<double>(p[j]);
          q += static_cast<double>(p[i]) * rowsum;
        }
        que_score[r] = q;
      }
    }
    __syncwarp();
  }
}

template <typename Tag>
void project_impl(const MatrixView& x, const int64_t* groups, const double* means, const void* dirs, int64_t k,
                  void* proj, double* score, const double* que, double* que_score, cudaStream_t stream) {
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  const int64_t blocks = std::clamp<int64_t>((x.rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, kMaxGrid);
  project_kernel<Tag><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarp, 0, stream>>>(
      static_cast<const S*>(x.data), x.rows, x.cols, x.row_stride, x.col_stride, groups, means,
      static_cast<const C*>(dirs), k, static_cast<C*>(proj), score, que, que_score);
  PG_CUDA_CHECK_LAUNCH();
}

}  // namespace

void project_scores_cuda(const MatrixView& x, const int64_t* groups, int64_t n_groups, const double* means,
                         const void* dirs, int64_t k, void* proj, double* score, const double* que, double* que_score,
                         std::uintptr_t stream) {
  PG_CHECK(n_groups >= 1, "n_groups must be >= 1");
  PG_CHECK(k >= 1 && k <= kMaxK, "n_components must be in [1, ", kMaxK, "] on CUDA, got ", k);
  PG_CHECK(x.rows >= 0 && x.cols >= 0, "x has a negative shape");
  if (x.rows == 0) return;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(x.dtype, [&](auto tag) {
    project_impl<decltype(tag)>(x, groups, means, dirs, k, proj, score, que, que_score, s);
  });
}

}  // namespace pg
