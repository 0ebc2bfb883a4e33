// CUDA kernels of the trimmed cross-entropy, the device twin of csrc/cpu/trim_cpu.cpp:
//
//   1. one warp per row: online max / Σ exp (each lane over its strided columns, merged by shuffles), the loss, and
//      a radix key: the loss's bits mapped to an order-preserving uint64 (ignored rows get the largest key);
//   2. a stable CUB radix sort of (key, row index) pairs: the first k indices are the kept rows, equal losses in
//      index order (stability), then keep[] is written from the sorted order;
//   3. one block adds the kept losses in a fixed order (bitwise reproducible, no atomics);
//   4. backward: one warp per row writes (exp(x − max − log_sum) − onehot) · scale, or zeros on dropped rows.
//
// Nothing synchronises with the host; temporary buffers are stream-ordered allocations on the caller's stream.
// A device kernel cannot raise: a valid row with NaN or +inf logits gets a NaN loss, sorted after every finite one
// (so trimming drops it first; if kept, the total is NaN). The caller validates the targets.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/check.h"
#include "common/dtype.h"
#include "cuda/cuda_check.h"
#include "trim.h"

namespace pg {

namespace {

constexpr int kWarp = 32;
constexpr int kRowThreads = 256;  // 8 rows (warps) per block
constexpr int kRowsPerBlock = kRowThreads / kWarp;
constexpr int kFlatThreads = 256;
constexpr int kTotalThreads = 1024;
constexpr int64_t kMaxGrid = int64_t{1} << 20;
constexpr uint64_t kIgnoredKey = ~uint64_t{0};
constexpr uint64_t kNanKey = ~uint64_t{0} - 1;

unsigned grid_for(int64_t work, int64_t per_block) {
  return static_cast<unsigned>(std::clamp<int64_t>((work + per_block - 1) / per_block, 1, kMaxGrid));
}

// Order-preserving map of a double to uint64 (negative values flipped entirely, positive ones get the sign bit).
__device__ __forceinline__ uint64_t order_key(double v) {
  if (isnan(v)) return kNanKey;
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(v));
  return (bits >> 63) ? ~bits : (bits | (uint64_t{1} << 63));
}

__device__ __forceinline__ float exp_c(float x) {
  return expf(x);
}
__device__ __forceinline__ double exp_c(double x) {
  return exp(x);
}

template <typename C>
__device__ __forceinline__ void merge_max_sum(C& m, C& s, C m2, C s2) {
  const C inf = std::numeric_limits<C>::infinity();
  const C mm = m > m2 ? m : m2;
  if (mm == -inf) return;  // both empty so far
  const C a = m == -inf ? C(0) : s * exp_c(m - mm);
  const C b = m2 == -inf ? C(0) : s2 * exp_c(m2 - mm);
  m = mm;
  s = a + b;
}

// Stores a compute-type value into the storage type.
__device__ __forceinline__ void store(f16_tag, uint16_t* p, float v) {
  *p = __half_as_ushort(__float2half_rn(v));
}
__device__ __forceinline__ void store(bf16_tag, uint16_t* p, float v) {
  *p = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ void store(f32_tag, float* p, float v) {
  *p = v;
}
__device__ __forceinline__ void store(f64_tag, double* p, double v) {
  *p = v;
}

template <typename Tag>
__global__ void row_stats_kernel(LogitsView x,                        // [B, C, P]
                                 const int64_t* __restrict__ target,  // [n]
                                 int64_t ignore_index, TrimRows rows,
                                 uint64_t* __restrict__ keys,  // [n]
                                 int64_t* __restrict__ index,  // [n]
                                 int64_t n) {
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  const C inf = std::numeric_limits<C>::infinity();
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t{gridDim.x} * kRowsPerBlock;
  for (int64_t r = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / kWarp; r < n; r += warps) {
    const int64_t t = target[r];
    if (t == ignore_index) {
      if (lane == 0) {
        rows.loss[r] = rows.row_max[r] = rows.log_sum[r] = 0.0;
        keys[r] = kIgnoredKey;
        index[r] = r;
      }
      continue;
    }
    const S* xr = static_cast<const S*>(x.data) + x.row_offset(r);
    C m = -inf, s = C(0);
    bool bad = false;
    for (int64_t j = lane; j < x.classes; j += kWarp) {
      const C v = load(Tag{}, xr + j * x.stride_c);
      if (isnan(v) || v == inf) {
        bad = true;
      } else if (v > m) {
        s = (m == -inf ? C(0) : s * exp_c(m - v)) + C(1);
        m = v;
      } else if (v > -inf) {
        s += exp_c(v - m);
      }
    }
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const C m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const C s2 = __shfl_xor_sync(0xffffffffu, s, off);
      merge_max_sum(m, s, m2, s2);
    }
    bad = __any_sync(0xffffffffu, bad) || m == -inf;
    if (lane == 0) {
      const double md = static_cast<double>(m);
      const double ls = log(static_cast<double>(s));
      const double xt = static_cast<double>(load(Tag{}, xr + t * x.stride_c));
      const double loss = bad ? nan("") : (md - xt) + ls;
      rows.row_max[r] = md;
      rows.log_sum[r] = ls;
      rows.loss[r] = loss;
      keys[r] = order_key(loss);
      index[r] = r;
    }
  }
}

__global__ void mark_kept_kernel(const int64_t* __restrict__ sorted_index,  // [n]
                                 int64_t n, int64_t k,
                                 uint8_t* __restrict__ keep) {  // [n]
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    keep[sorted_index[i]] = i < k ? 1 : 0;
}

// One block: per-thread sums over a fixed stride, then a fixed tree.
__global__ void kept_total_kernel(const double* __restrict__ loss,  // [n]
                                  const uint8_t* __restrict__ keep, int64_t n, double* __restrict__ total) {
  __shared__ double part[kTotalThreads];
  double s = 0.0;
  for (int64_t r = threadIdx.x; r < n; r += kTotalThreads)
    if (keep[r]) s += loss[r];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = kTotalThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) total[0] = part[0];
}

template <typename Tag>
__global__ void grad_kernel(LogitsView x,                        // [B, C, P]
                            const int64_t* __restrict__ target,  // [n]
                            TrimRows rows, const double* __restrict__ scale, int64_t scale_stride, double factor,
                            LogitsView g,  // [B, C, P] written
                            int64_t n) {
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t{gridDim.x} * kRowsPerBlock;
  for (int64_t r = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / kWarp; r < n; r += warps) {
    S* gr = static_cast<S*>(const_cast<void*>(g.data)) + g.row_offset(r);
    if (!rows.keep[r]) {
      for (int64_t j = lane; j < x.classes; j += kWarp) store(Tag{}, gr + j * g.stride_c, C(0));
      continue;
    }
    const S* xr = static_cast<const S*>(x.data) + x.row_offset(r);
    const int64_t t = target[r];
    const C s = static_cast<C>(factor * scale[r * scale_stride]);
    const C m = static_cast<C>(rows.row_max[r]);
    const C ls = static_cast<C>(rows.log_sum[r]);
    for (int64_t j = lane; j < x.classes; j += kWarp) {
      const C p = exp_c((load(Tag{}, xr + j * x.stride_c) - m) - ls);
      store(Tag{}, gr + j * g.stride_c, j == t ? p * s - s : p * s);
    }
  }
}

// Stream-ordered temporary memory, freed on the stream (also when an exception unwinds).
class stream_buffer {
 public:
  stream_buffer(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes > 0) PG_CUDA_CHECK(cudaMallocAsync(&p_, bytes, stream));
  }
  ~stream_buffer() {
    if (p_ != nullptr) (void)cudaFreeAsync(p_, stream_);
  }
  stream_buffer(const stream_buffer&) = delete;
  stream_buffer& operator=(const stream_buffer&) = delete;
  template <typename T>
  T* as(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(p_) + byte_offset);
  }

 private:
  void* p_ = nullptr;
  cudaStream_t stream_;
};

size_t align256(size_t b) {
  return (b + 255) / 256 * 256;
}

}  // namespace

void trimmed_cross_entropy_forward_cuda(const LogitsView& logits, const int64_t* target, int64_t ignore_index,
                                        int64_t k, TrimRows rows, double* total, std::uintptr_t stream_id) {
  const int64_t n = logits.rows();
  PG_CHECK(logits.classes >= 1, "logits must have at least one class");
  PG_CHECK(k >= 0 && k <= n, "k must be in [0, ", n, "], got ", k);
  PG_CHECK(n < (int64_t{1} << 31), "the CUDA trimmed cross-entropy takes fewer than 2^31 rows, got ", n);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_id);
  if (n == 0) {
    PG_CUDA_CHECK(cudaMemsetAsync(total, 0, sizeof(double), stream));
    return;
  }
  const int num = static_cast<int>(n);
  size_t sort_bytes = 0;
  PG_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const uint64_t*>(nullptr),
                                                static_cast<uint64_t*>(nullptr), static_cast<const int64_t*>(nullptr),
                                                static_cast<int64_t*>(nullptr), num, 0, 64, stream));
  const size_t part = align256(static_cast<size_t>(n) * 8);
  stream_buffer buf(4 * part + align256(sort_bytes), stream);
  uint64_t* keys_in = buf.as<uint64_t>(0);
  uint64_t* keys_out = buf.as<uint64_t>(part);
  int64_t* idx_in = buf.as<int64_t>(2 * part);
  int64_t* idx_out = buf.as<int64_t>(3 * part);
  void* temp = buf.as<void>(4 * part);

  const unsigned grid = grid_for(n, kRowsPerBlock);
  dispatch_dtype(logits.dtype, [&](auto tag) {
    row_stats_kernel<decltype(tag)>
        <<<grid, kRowThreads, 0, stream>>>(logits, target, ignore_index, rows, keys_in, idx_in, n);
    return 0;
  });
  PG_CUDA_CHECK_LAUNCH();
  // Stable: equal keys keep index order, so equal losses keep the lower index.
  PG_CUDA_CHECK(
      cub::DeviceRadixSort::SortPairs(temp, sort_bytes, keys_in, keys_out, idx_in, idx_out, num, 0, 64, stream));
  mark_kept_kernel<<<grid_for(n, kFlatThreads), kFlatThreads, 0, stream>>>(idx_out, n, k, rows.keep);
  PG_CUDA_CHECK_LAUNCH();
  kept_total_kernel<<<1, kTotalThreads, 0, stream>>>(rows.loss, rows.keep, n, total);
  PG_CUDA_CHECK_LAUNCH();
}

void trimmed_cross_entropy_backward_cuda(const LogitsView& logits, const int64_t* target, const TrimRows& rows,
                                         const double* scale, int64_t scale_stride, double factor,
                                         const LogitsView& grad, std::uintptr_t stream_id) {
  PG_CHECK(grad.batch == logits.batch && grad.classes == logits.classes && grad.positions == logits.positions,
           "grad must have the logits' shape");
  PG_CHECK(grad.dtype == logits.dtype, "grad must have the logits' dtype");
  const int64_t n = logits.rows();
  if (n == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_id);
  const unsigned grid = grid_for(n, kRowsPerBlock);
  dispatch_dtype(logits.dtype, [&](auto tag) {
    grad_kernel<decltype(tag)>
        <<<grid, kRowThreads, 0, stream>>>(logits, target, rows, scale, scale_stride, factor, grad, n);
    return 0;
  });
  PG_CUDA_CHECK_LAUNCH();
}

}  // namespace pg
