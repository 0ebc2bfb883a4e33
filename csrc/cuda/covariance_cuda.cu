// Streaming per-group covariance on CUDA, the device twin of csrc/cpu/covariance_cpu.cpp (same math):
//
//   1. stable radix sort of row indices by group id (CUB) and per-group offsets by binary search;
//   2. per group, the shift s_g in the compute type: the running mean, or for a group seen for the first time the
//      mean of its rows in this chunk (fp64 column sums of the converted rows per piece, see 4, added in piece order;
//      a shift one sample away from the mean leaves a rank-one part n·|x₀ − μ|² in the compute-type products that
//      the fp64 correction cancels, losing ~sqrt(d) digits);
//   3. gather + shift into a contiguous [n, ld] buffer y in the compute type (one read of x, any strides/dtype; the
//      rows of first-seen groups are read once more for their shift);
//   4. each group's rows are cut into "pieces" of R rows (R a multiple of 256) so that a big group still gives
//      enough blocks; per (piece, column) fp64 column sums, then per group δ = Σ y / n_b and dμ;
//   5. a tiled SYRK over (upper-triangular 64x64 tiles, pieces): fp32 products (fp64 for fp64 input) summed in the
//      compute type over blocks of at most 256 rows, the blocks added in fp64. A one-piece group merges into m2 in
//      the epilogue (Chan's formula); the pieces of a bigger group write fp64 partial tiles that a reduce kernel
//      adds in piece order, then merges;
//   6. mean and count, last, because the m2 merge reads the old count.
//
// Every sum has a fixed order (no floating-point atomics), so results are bitwise reproducible. Nothing waits on the
// host: per-group sizes stay on the device and grids are sized from bounds known on the host (idle blocks exit).
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/check.h"
#include "common/dtype.h"
#include "covariance.h"
#include "cuda/cuda_check.h"

namespace pg {

namespace {

// SYRK tiling: a 64x64 output tile per block, 128 threads as 8 (i) x 16 (j), each owning 8 x 4 outputs in
// registers; rows stream through shared memory 16 at a time, double-buffered.
constexpr int kTile = 64;
constexpr int kBlockK = 16;
constexpr int kSyrkThreads = 128;
constexpr int kThreadRows = 8;
constexpr int kThreadCols = 4;
static_assert((kTile / kThreadRows) * (kTile / kThreadCols) == kSyrkThreads, "thread grid must cover the tile");

// Compute-type sums run over at most kFlushRows rows before they are added into fp64 (bounds fp32 rounding growth),
// as running sums over kInnerRows rows added together. Pieces are multiples of kFlushRows, so every block of rows
// lies inside one piece and the blocks are the same however a group is cut.
constexpr int64_t kInnerRows = 64;
constexpr int64_t kFlushRows = 256;
static_assert(kInnerRows % kBlockK == 0 && kFlushRows % kInnerRows == 0, "blocks must be whole stages");
// A piece has at least this many rows so that writing its 32 KiB partial tile is small next to its products.
constexpr int64_t kMinPieceRows = 1024;
// SYRK blocks aimed at per SM: ~4 resident blocks of 128 threads, two waves, so a short tail costs little.
constexpr int64_t kBlocksPerSm = 8;

constexpr int kReduceThreads = 256;
constexpr int kColThreadsX = 32;  // column sums: 32 columns x 8 row lanes
constexpr int kColThreadsY = 8;
constexpr int kGroupThreads = 256;
constexpr int kFlatThreads = 256;
// Grid-stride loops cover the rest: keeps every grid inside the hardware limits whatever n and G are.
constexpr int64_t kMaxGridX = int64_t{1} << 20;
constexpr int64_t kMaxGridY = 65535;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
int64_t round_up(int64_t a, int64_t b) {
  return ceil_div(a, b) * b;
}
unsigned grid_x(int64_t blocks) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kMaxGridX));
}
unsigned grid_y(int64_t blocks) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kMaxGridY));
}

// 16-byte vectors of the compute type: the SYRK loads whole vectors, so y rows are padded to a multiple of them.
template <typename C>
struct vec16;
template <>
struct vec16<float> {
  using type = float4;
  static constexpr int width = 4;
};
template <>
struct vec16<double> {
  using type = double2;
  static constexpr int width = 2;
};

__device__ __forceinline__ void unpack(const float4& v, float* out) {
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
__device__ __forceinline__ void unpack(const double2& v, double* out) {
  out[0] = v.x;
  out[1] = v.y;
}

// Largest g in [0, count) with starts[g] <= key, for non-decreasing starts with starts[0] <= key: the segment that
// holds `key` (empty segments, starts[g] == starts[g + 1], are skipped over).
__device__ __forceinline__ int64_t find_segment(const int64_t* starts,  // [count + 1]
                                                int64_t count, int64_t key) {
  int64_t lo = 0, hi = count;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (starts[mid] <= key)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// Upper-triangular tile number -> (tile row, tile column), row-major over the tiles with tj >= ti.
__device__ __forceinline__ void tile_coords(int64_t tile, int64_t nt, int64_t& ti, int64_t& tj) {
  ti = 0;
  while (tile >= nt - ti) {
    tile -= nt - ti;
    ++ti;
  }
  tj = ti + tile;
}

// Chan's update of one upper-triangle entry: m2 += C − n_b δ_i δ_j + f dμ_i dμ_j, f = n_a n_b / n (0 when n_a = 0).
__device__ __forceinline__ void merge_entry(double* m2,           // [G, d, d]
                                            const double* delta,  // [G, d]
                                            const double* dmu,    // [G, d]
                                            int64_t g, int64_t d, int64_t i, int64_t j, double c, double nb, double f) {
  const double* dg = delta + g * d;
  const double* mg = dmu + g * d;
  m2[(g * d + i) * d + j] += c + (-nb * dg[i]) * dg[j] + (f * mg[i]) * mg[j];
}

__device__ __forceinline__ double chan_factor(int64_t na, int64_t nb) {
  return na > 0 ? static_cast<double>(na) * static_cast<double>(nb) / static_cast<double>(na + nb) : 0.0;
}

__global__ void iota_kernel(int64_t* out,  // [n]
                            int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = i;
}

// offsets[g] = first sorted position of group g (binary search; keys == nullptr means every row is in group 0).
__global__ void offsets_kernel(const int64_t* sorted_keys,  // [n] or nullptr
                               int64_t n, int64_t n_groups,
                               int64_t* offsets) {  // [G + 1]
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g <= n_groups;
       g += int64_t{gridDim.x} * blockDim.x) {
    if (sorted_keys == nullptr) {
      offsets[g] = g == 0 ? 0 : n;
      continue;
    }
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (sorted_keys[mid] < g)
        lo = mid + 1;
      else
        hi = mid;
    }
    offsets[g] = lo;
  }
}

// Pieces per group and partial-tile slots (only groups of more than one piece need slots); scanned afterwards.
__global__ void plan_kernel(const int64_t* offsets,  // [G + 1]
                            int64_t n_groups, int64_t piece_rows,
                            int64_t* pieces,   // [G + 1], last entry 0
                            int64_t* slots) {  // [G + 1], last entry 0
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g <= n_groups;
       g += int64_t{gridDim.x} * blockDim.x) {
    const int64_t p = g < n_groups ? ceil_div(offsets[g + 1] - offsets[g], piece_rows) : 0;
    pieces[g] = p;
    slots[g] = p > 1 ? p : 0;
  }
}

// y[p, c] = x[perm[p], c] − s_{group(p)}[c] in the compute type; columns d..ld-1 are zero padding for the SYRK's
// vector loads. Block = 32 columns x 8 rows, so a warp reads and writes a run of one row.
template <typename Tag>
__global__ void gather_kernel(MatrixView x,                        // [n, d] device
                              const int64_t* perm,                 // [n] or nullptr
                              const int64_t* sorted_keys,          // [n] or nullptr (all group 0)
                              const typename Tag::compute* shift,  // [G, d]
                              int64_t n, int64_t d, int64_t ld,
                              typename Tag::compute* y) {  // [n, ld]
  using S = typename Tag::storage;
  using C = typename Tag::compute;
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c >= ld) return;  // no block-level synchronisation below
  for (int64_t p = blockIdx.y * int64_t{blockDim.y} + threadIdx.y; p < n; p += int64_t{gridDim.y} * blockDim.y) {
    C v = C(0);
    if (c < d) {
      const int64_t g = sorted_keys ? sorted_keys[p] : 0;
      const S* row = x.row<S>(perm ? perm[p] : p);
      v = load(Tag{}, row + c * x.col_stride) - shift[g * d + c];
    }
    y[p * ld + c] = v;
  }
}

// The rows [begin, end) of work item `item` (piece `item - item_start[g]` of group g); false for an idle item.
__device__ __forceinline__ bool item_rows(const int64_t* offsets,     // [G + 1]
                                          const int64_t* item_start,  // [G + 1]
                                          int64_t n_groups, int64_t piece_rows, int64_t item, int64_t& g,
                                          int64_t& piece, int64_t& begin, int64_t& end) {
  if (item >= item_start[n_groups]) return false;
  g = find_segment(item_start, n_groups, item);
  piece = item - item_start[g];
  begin = offsets[g] + piece * piece_rows;
  end = begin + piece_rows < offsets[g + 1] ? begin + piece_rows : offsets[g + 1];
  return true;
}

// Column c of the gathered, shifted rows y.
template <typename C>
struct shifted_rows {
  const C* y;  // [n, ld]
  int64_t ld;
  __device__ __forceinline__ double operator()(int64_t p, int64_t c) const {
    return static_cast<double>(y[p * ld + c]);
  }
};

// Column c of the rows of x in the group-sorted order, converted to the compute type (exact in fp64).
template <typename Tag>
struct raw_rows {
  MatrixView x;         // [n, d] device
  const int64_t* perm;  // [n] or nullptr
  __device__ __forceinline__ double operator()(int64_t p, int64_t c) const {
    using S = typename Tag::storage;
    return static_cast<double>(load(Tag{}, x.row<S>(perm ? perm[p] : p) + c * x.col_stride));
  }
};

// Column sums of `rows` over each piece in fp64, in a fixed order: 8 row lanes x 4 interleaved accumulators, then the
// lanes in order. With `first_only` (the group counts) only the pieces of groups without data are summed; the other
// pieces' entries are left as they are.
template <typename Rows>
__global__ void colsum_kernel(Rows rows, int64_t d,
                              const int64_t* offsets,     // [G + 1]
                              const int64_t* item_start,  // [G + 1]
                              int64_t n_groups, int64_t piece_rows, int64_t n_items_max,
                              const int64_t* first_only,  // [G] or nullptr
                              double* piece_sums) {       // [n_items_max, d]
  __shared__ double lanes[kColThreadsY][kColThreadsX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * int64_t{kColThreadsX} + tx;
  for (int64_t item = blockIdx.y; item < n_items_max; item += gridDim.y) {
    int64_t g, piece, begin, end;
    if (!item_rows(offsets, item_start, n_groups, piece_rows, item, g, piece, begin, end)) break;
    if (first_only != nullptr && first_only[g] > 0) continue;  // the same for the whole block
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    if (c < d) {
      int64_t r = begin + ty;
      for (; r + 3 * kColThreadsY < end; r += 4 * kColThreadsY) {
        s0 += rows(r, c);
        s1 += rows(r + kColThreadsY, c);
        s2 += rows(r + 2 * kColThreadsY, c);
        s3 += rows(r + 3 * kColThreadsY, c);
      }
      for (; r < end; r += kColThreadsY) s0 += rows(r, c);
    }
    lanes[ty][tx] = (s0 + s1) + (s2 + s3);
    __syncthreads();
    if (ty == 0 && c < d) {
      double total = 0.0;
#pragma unroll
      for (int k = 0; k < kColThreadsY; ++k) total += lanes[k][tx];
      piece_sums[item * d + c] = total;
    }
    __syncthreads();  // lanes is reused by the next item
  }
}

// s_g in the compute type: the running mean when the group has data, else the mean of its rows in this chunk, from
// the raw piece sums added in piece order (as in delta_kernel). A non-finite mean gives 0, as on the CPU (the
// caller's NaN/Inf check reports such rows).
template <typename C>
__global__ void shift_kernel(const double* piece_sums,   // [n_items_max, d], raw rows of groups without data
                             const int64_t* item_start,  // [G + 1]
                             const int64_t* offsets,     // [G + 1]
                             const int64_t* count,       // [G]
                             const double* mean,         // [G, d]
                             int64_t n_groups, int64_t d,
                             C* shift) {  // [G, d]
  for (int64_t g = blockIdx.x; g < n_groups; g += gridDim.x) {
    const int64_t nb = offsets[g + 1] - offsets[g];
    if (nb == 0) continue;
    C* s = shift + g * d;
    if (count[g] > 0) {
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) s[c] = static_cast<C>(mean[g * d + c]);
    } else {
      const double inv = 1.0 / static_cast<double>(nb);
      const int64_t it0 = item_start[g], it1 = item_start[g + 1];
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        double sum = 0.0;
        for (int64_t it = it0; it < it1; ++it) sum += piece_sums[it * d + c];
        s[c] = isfinite(sum) ? static_cast<C>(sum * inv) : C(0);
      }
    }
  }
}

// Per group: δ = (Σ over pieces in order) / n_b, μ_b = s + δ (s as the compute-type value actually subtracted, so
// μ_b is exact in math), dμ = μ_b − mean when the group had data (unused otherwise, as in the CPU kernel).
template <typename C>
__global__ void delta_kernel(const double* piece_sums,   // [n_items_max, d]
                             const int64_t* item_start,  // [G + 1]
                             const int64_t* offsets,     // [G + 1]
                             const int64_t* count,       // [G]
                             const double* mean,         // [G, d]
                             const C* shift,             // [G, d]
                             int64_t n_groups, int64_t d,
                             double* delta,  // [G, d]
                             double* dmu) {  // [G, d]
  for (int64_t g = blockIdx.x; g < n_groups; g += gridDim.x) {
    const int64_t nb = offsets[g + 1] - offsets[g];
    if (nb == 0) continue;
    const bool had_data = count[g] > 0;
    const int64_t it0 = item_start[g], it1 = item_start[g + 1];
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      double sum = 0.0;
      for (int64_t it = it0; it < it1; ++it) sum += piece_sums[it * d + c];
      const double dl = sum / static_cast<double>(nb);
      delta[g * d + c] = dl;
      dmu[g * d + c] = had_data ? (static_cast<double>(shift[g * d + c]) + dl) - mean[g * d + c] : 0.0;
    }
  }
}

// One thread's 8 x 4 outputs. fp32 compute: register sums over 64 rows, four of those added in a second set of
// fp32 registers (a 256-row block, pairwise-like: ~5x smaller rounding error than one running sum over 256 rows),
// then added into fp64 totals that live in shared memory (registers stay for the products; the fp64 adds and the
// conversions run once per 256 rows). fp64 compute: one set of fp64 registers.
template <typename C>
struct tile_acc;

template <>
struct tile_acc<float> {
  float part[kThreadRows][kThreadCols];
  float block[kThreadRows][kThreadCols];
  double* total;  // this thread's entries of the shared [kThreadRows * kThreadCols][kSyrkThreads] totals

  __device__ __forceinline__ void init(double* shared_totals) {
    total = shared_totals + threadIdx.x;  // thread-major: a warp touches consecutive doubles (no bank conflicts)
#pragma unroll
    for (int m = 0; m < kThreadRows; ++m)
#pragma unroll
      for (int q = 0; q < kThreadCols; ++q) {
        part[m][q] = 0.0f;
        block[m][q] = 0.0f;
        total[(m * kThreadCols + q) * kSyrkThreads] = 0.0;
      }
  }
  __device__ __forceinline__ void end_inner() {
#pragma unroll
    for (int m = 0; m < kThreadRows; ++m)
#pragma unroll
      for (int q = 0; q < kThreadCols; ++q) {
        block[m][q] += part[m][q];
        part[m][q] = 0.0f;
      }
  }
  __device__ __forceinline__ void end_block() {
#pragma unroll
    for (int m = 0; m < kThreadRows; ++m)
#pragma unroll
      for (int q = 0; q < kThreadCols; ++q) {
        total[(m * kThreadCols + q) * kSyrkThreads] += static_cast<double>(block[m][q]);
        block[m][q] = 0.0f;
      }
  }
  __device__ __forceinline__ double value(int m, int q) const { return total[(m * kThreadCols + q) * kSyrkThreads]; }
};

template <>
struct tile_acc<double> {
  double part[kThreadRows][kThreadCols];

  __device__ __forceinline__ void init(double*) {
#pragma unroll
    for (int m = 0; m < kThreadRows; ++m)
#pragma unroll
      for (int q = 0; q < kThreadCols; ++q) part[m][q] = 0.0;
  }
  __device__ __forceinline__ void end_inner() {}
  __device__ __forceinline__ void end_block() {}
  __device__ __forceinline__ double value(int m, int q) const { return part[m][q]; }
};

// Block (tile, item): the tile's entries of Σ_r y_r y_rᵀ over the item's rows. Diagonal tiles read one panel for
// both factors. The epilogue merges into m2 when the group is one piece, else stores the fp64 partial tile.
template <typename C>
__global__ void __launch_bounds__(kSyrkThreads) syrk_kernel(const C* y,  // [n, ld]
                                                            int64_t ld, int64_t d, int64_t nt,
                                                            const int64_t* offsets,     // [G + 1]
                                                            const int64_t* item_start,  // [G + 1]
                                                            const int64_t* slot_start,  // [G + 1]
                                                            int64_t n_groups, int64_t piece_rows, int64_t n_items_max,
                                                            const int64_t* count,  // [G]
                                                            const double* delta,   // [G, d]
                                                            const double* dmu,     // [G, d]
                                                            double* m2,            // [G, d, d], upper triangle
                                                            double* partial) {     // [slots, n_tiles, 64, 64]
  using V = typename vec16<C>::type;
  constexpr int W = vec16<C>::width;
  constexpr int kVecPerRow = kTile / W;
  constexpr int kLoads = kBlockK * kVecPerRow / kSyrkThreads;  // vectors per thread per panel and stage
  static_assert(kLoads * kSyrkThreads == kBlockK * kVecPerRow, "stage must split evenly over the threads");

  __shared__ __align__(16) C stage[2][2][kBlockK][kTile];  // [buffer][panel i/j][row][column]
  // fp64 totals of the fp32 path (48 KiB of static shared memory with the stages); unused for fp64.
  __shared__ double totals[std::is_same<C, float>::value ? kThreadRows * kThreadCols * kSyrkThreads : 1];

  const int tid = threadIdx.x;
  const int ty = tid / (kTile / kThreadCols);  // 0..7: rows i = ty*8 .. ty*8+7 of the tile
  const int tx = tid % (kTile / kThreadCols);  // 0..15: columns j = tx*4 .. tx*4+3
  const int64_t n_tiles = nt * (nt + 1) / 2;
  int64_t ti, tj;
  tile_coords(blockIdx.x, nt, ti, tj);
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  const bool diag = ti == tj;

  for (int64_t item = blockIdx.y; item < n_items_max; item += gridDim.y) {
    int64_t g, piece, begin, end;
    if (!item_rows(offsets, item_start, n_groups, piece_rows, item, g, piece, begin, end)) break;
    const int64_t steps = (end - begin + kBlockK - 1) / kBlockK;

    V ra[kLoads], rb[kLoads];
    // Rows past the piece and columns past ld read as zero, so partial stages need no special case.
    auto fetch = [&](int64_t r0) {
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        const int idx = tid + l * kSyrkThreads;
        const int64_t r = r0 + idx / kVecPerRow;
        const int64_t col = (idx % kVecPerRow) * W;
        const bool row_ok = r < end;
        ra[l] = row_ok && i0 + col < ld ? *reinterpret_cast<const V*>(y + r * ld + i0 + col) : V{};
        if (!diag) rb[l] = row_ok && j0 + col < ld ? *reinterpret_cast<const V*>(y + r * ld + j0 + col) : V{};
      }
    };
    auto store = [&](int buf) {
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        const int idx = tid + l * kSyrkThreads;
        const int row = idx / kVecPerRow, col = (idx % kVecPerRow) * W;
        *reinterpret_cast<V*>(&stage[buf][0][row][col]) = ra[l];
        if (!diag) *reinterpret_cast<V*>(&stage[buf][1][row][col]) = rb[l];
      }
    };

    tile_acc<C> acc;
    acc.init(totals);
    fetch(begin);
    store(0);
    __syncthreads();
    for (int64_t s = 0; s < steps; ++s) {
      const int buf = static_cast<int>(s & 1);
      if (s + 1 < steps) fetch(begin + (s + 1) * kBlockK);  // global loads in flight during the products
      const C* a_panel = &stage[buf][0][0][0];
      const C* b_panel = diag ? a_panel : &stage[buf][1][0][0];
#pragma unroll
      for (int k = 0; k < kBlockK; ++k) {
        C a[kThreadRows], b[kThreadCols];
#pragma unroll
        for (int v = 0; v < kThreadRows / W; ++v)
          unpack(*reinterpret_cast<const V*>(a_panel + k * kTile + ty * kThreadRows + v * W), a + v * W);
#pragma unroll
        for (int v = 0; v < kThreadCols / W; ++v)
          unpack(*reinterpret_cast<const V*>(b_panel + k * kTile + tx * kThreadCols + v * W), b + v * W);
#pragma unroll
        for (int m = 0; m < kThreadRows; ++m)
#pragma unroll
          for (int q = 0; q < kThreadCols; ++q) acc.part[m][q] = fma(a[m], b[q], acc.part[m][q]);
      }
      // Pieces start on 256-row boundaries of the group, so these blocks are the group's 64- and 256-row blocks.
      const bool last = s + 1 == steps;
      if ((s + 1) % (kInnerRows / kBlockK) == 0 || last) acc.end_inner();
      if ((s + 1) % (kFlushRows / kBlockK) == 0 || last) acc.end_block();
      if (s + 1 < steps) store(buf ^ 1);  // the other buffer was last read before the previous barrier
      __syncthreads();
    }

    const int64_t pieces = item_start[g + 1] - item_start[g];
    if (pieces == 1) {
      const int64_t na = count[g], nb = end - begin;
      const double f = chan_factor(na, nb);
#pragma unroll
      for (int m = 0; m < kThreadRows; ++m) {
        const int64_t i = i0 + ty * kThreadRows + m;
#pragma unroll
        for (int q = 0; q < kThreadCols; ++q) {
          const int64_t j = j0 + tx * kThreadCols + q;
          if (i < d && j < d && j >= i)
            merge_entry(m2, delta, dmu, g, d, i, j, acc.value(m, q), static_cast<double>(nb), f);
        }
      }
    } else {
      double* dst = partial + ((slot_start[g] + piece) * n_tiles + blockIdx.x) * (kTile * kTile);
#pragma unroll
      for (int m = 0; m < kThreadRows; ++m)
#pragma unroll
        for (int q = 0; q < kThreadCols; ++q)
          dst[(ty * kThreadRows + m) * kTile + tx * kThreadCols + q] = acc.value(m, q);
    }
  }
}

// Groups of several pieces: adds their partial tiles in piece order and merges into m2. Block (256 entries of a tile,
// slot); only the group's first slot works, the others exit.
__global__ void reduce_kernel(const double* partial,      // [slots, n_tiles, 64, 64]
                              const int64_t* slot_start,  // [G + 1]
                              const int64_t* offsets,     // [G + 1]
                              const int64_t* count,       // [G]
                              const double* delta,        // [G, d]
                              const double* dmu,          // [G, d]
                              int64_t n_groups, int64_t d, int64_t nt, int64_t n_slots_max,
                              double* m2) {  // [G, d, d], upper triangle
  constexpr int kChunks = kTile * kTile / kReduceThreads;
  const int64_t n_tiles = nt * (nt + 1) / 2;
  const int64_t tile = blockIdx.x / kChunks;
  const int e = static_cast<int>(blockIdx.x % kChunks) * kReduceThreads + threadIdx.x;
  int64_t ti, tj;
  tile_coords(tile, nt, ti, tj);
  const int64_t i = ti * kTile + e / kTile, j = tj * kTile + e % kTile;
  if (i >= d || j >= d || j < i) return;  // no block-level synchronisation in this kernel
  for (int64_t slot = blockIdx.y; slot < n_slots_max; slot += gridDim.y) {
    if (slot >= slot_start[n_groups]) break;
    const int64_t g = find_segment(slot_start, n_groups, slot);
    if (slot != slot_start[g]) continue;
    const int64_t pieces = slot_start[g + 1] - slot;
    double c = 0.0;
    for (int64_t p = 0; p < pieces; ++p) c += partial[((slot + p) * n_tiles + tile) * (kTile * kTile) + e];
    const int64_t na = count[g], nb = offsets[g + 1] - offsets[g];
    merge_entry(m2, delta, dmu, g, d, i, j, c, static_cast<double>(nb), chan_factor(na, nb));
  }
}

// Last step: mean = mean_a + dμ n_b / n (or s + δ for a group seen for the first time), count = n_a + n_b.
template <typename C>
__global__ void mean_count_kernel(const int64_t* offsets,  // [G + 1]
                                  const C* shift,          // [G, d]
                                  const double* delta,     // [G, d]
                                  const double* dmu,       // [G, d]
                                  int64_t n_groups, int64_t d,
                                  int64_t* count,  // [G]
                                  double* mean) {  // [G, d]
  for (int64_t g = blockIdx.x; g < n_groups; g += gridDim.x) {
    const int64_t nb = offsets[g + 1] - offsets[g];
    if (nb == 0) continue;
    const int64_t na = count[g], ntot = na + nb;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      const int64_t k = g * d + c;
      mean[k] = na > 0 ? mean[k] + dmu[k] * static_cast<double>(nb) / static_cast<double>(ntot)
                       : static_cast<double>(shift[k]) + delta[k];
    }
    __syncthreads();  // every thread has read count[g] before it changes
    if (threadIdx.x == 0) count[g] = ntot;
  }
}

// One stream-ordered allocation carved into aligned parts; freed on the stream (also when an exception unwinds).
class device_arena {
 public:
  device_arena(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes > 0) PG_CUDA_CHECK(cudaMallocAsync(&base_, bytes, stream));
  }
  ~device_arena() {
    if (base_ != nullptr) (void)cudaFreeAsync(base_, stream_);  // destructors must not throw
  }
  device_arena(const device_arena&) = delete;
  device_arena& operator=(const device_arena&) = delete;

  void release() {
    if (base_ != nullptr) {
      void* p = base_;
      base_ = nullptr;
      PG_CUDA_CHECK(cudaFreeAsync(p, stream_));
    }
  }
  char* base() const { return static_cast<char*>(base_); }

 private:
  void* base_ = nullptr;
  cudaStream_t stream_;
};

// Byte layout of the arena: add() reserves a 256-byte aligned part and returns its offset (see part()).
struct arena_layout {
  size_t total = 0;
  size_t add(size_t bytes) {
    const size_t at = total;
    total += (bytes + 255) / 256 * 256;
    return at;
  }
};

template <typename T>
T* part(const device_arena& arena, size_t at) {
  return reinterpret_cast<T*>(arena.base() + at);
}

template <typename Tag>
void update_impl(const MatrixView& x, const int64_t* groups, CovState st, cudaStream_t stream) {
  using C = typename Tag::compute;
  const int64_t n = x.rows, d = x.cols, G = st.n_groups;
  // One group needs no sort: every valid id is 0.
  const int64_t* keys_in = G > 1 ? groups : nullptr;

  int device = 0, sms = 0;
  PG_CUDA_CHECK(cudaGetDevice(&device));
  PG_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));

  // Work plan, from bounds known here. Pieces of R rows give ~kBlocksPerSm SYRK blocks per SM when the data is
  // balanced; R >= n means one piece per group (no partial tiles at all).
  const int64_t ld = round_up(std::max<int64_t>(d, 1), vec16<C>::width);
  const int64_t nt = ceil_div(d, kTile);
  const int64_t n_tiles = nt * (nt + 1) / 2;
  // Tiles index grid.x (and 16 blocks each in the reduce): 2^27 tiles means d beyond 10^6, far past any d x d state.
  PG_CHECK(n_tiles * (kTile * kTile / kReduceThreads) <= int64_t{0x7fffffff}, "n_features=", d,
           " is too large for the CUDA covariance kernel");
  const int64_t target_blocks = std::max<int64_t>(1, int64_t{sms} * kBlocksPerSm);
  const double balanced_rows = std::ceil(static_cast<double>(n) * static_cast<double>(std::max<int64_t>(n_tiles, 1)) /
                                         static_cast<double>(target_blocks));  // in double: n * n_tiles may overflow
  const int64_t piece_rows = round_up(
      std::min(n, std::max(kMinPieceRows, static_cast<int64_t>(std::min(balanced_rows, static_cast<double>(n))))),
      kFlushRows);
  // Σ_g ceil(n_g / R) <= n and < n / R + G. Only groups with n_g > R have slots, and ceil(n_g / R) < 2 n_g / R.
  const int64_t n_items_max = std::min(n, ceil_div(n, piece_rows) + G);
  const int64_t n_slots_max = piece_rows < n ? 2 * n / piece_rows : 0;

  size_t sort_temp_bytes = 0, scan_temp_bytes = 0;
  int end_bit = 1;
  while (end_bit < 63 && (int64_t{1} << end_bit) < G) ++end_bit;  // ids are in [0, G): sort only their bits
  if (keys_in != nullptr)
    PG_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_temp_bytes, keys_in, static_cast<int64_t*>(nullptr),
                                                  static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                                  n, 0, end_bit, stream));
  PG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_temp_bytes, static_cast<const int64_t*>(nullptr),
                                              static_cast<int64_t*>(nullptr), G + 1, stream));

  const size_t i64 = sizeof(int64_t), f64 = sizeof(double), cs = sizeof(C);
  const size_t un = static_cast<size_t>(n), ug = static_cast<size_t>(G), ud = static_cast<size_t>(d);
  const bool sorted = keys_in != nullptr, dense = d > 0;
  arena_layout lay;
  const size_t at_keys = lay.add(sorted ? un * i64 : 0);
  const size_t at_rows = lay.add(sorted ? un * i64 : 0);
  const size_t at_perm = lay.add(sorted ? un * i64 : 0);
  const size_t at_sort_temp = lay.add(sort_temp_bytes);
  const size_t at_scan_temp = lay.add(scan_temp_bytes);
  const size_t at_offsets = lay.add((ug + 1) * i64);
  const size_t at_pieces = lay.add((ug + 1) * i64);
  const size_t at_item_start = lay.add((ug + 1) * i64);
  const size_t at_slots = lay.add((ug + 1) * i64);
  const size_t at_slot_start = lay.add((ug + 1) * i64);
  const size_t at_shift = lay.add(dense ? ug * ud * cs : 0);
  const size_t at_y = lay.add(dense ? un * static_cast<size_t>(ld) * cs : 0);
  const size_t at_sums = lay.add(dense ? static_cast<size_t>(n_items_max) * ud * f64 : 0);
  const size_t at_delta = lay.add(dense ? ug * ud * f64 : 0);
  const size_t at_dmu = lay.add(dense ? ug * ud * f64 : 0);
  const size_t at_partial =
      lay.add(dense ? static_cast<size_t>(n_slots_max) * static_cast<size_t>(n_tiles) * kTile * kTile * f64 : 0);

  device_arena arena(lay.total, stream);
  int64_t* sorted_keys = sorted ? part<int64_t>(arena, at_keys) : nullptr;
  int64_t* perm = sorted ? part<int64_t>(arena, at_perm) : nullptr;
  int64_t* offsets = part<int64_t>(arena, at_offsets);
  int64_t* pieces = part<int64_t>(arena, at_pieces);
  int64_t* item_start = part<int64_t>(arena, at_item_start);
  int64_t* slots = part<int64_t>(arena, at_slots);
  int64_t* slot_start = part<int64_t>(arena, at_slot_start);
  C* shift = part<C>(arena, at_shift);
  C* y = part<C>(arena, at_y);
  double* piece_sums = part<double>(arena, at_sums);
  double* delta = part<double>(arena, at_delta);
  double* dmu = part<double>(arena, at_dmu);
  double* partial = part<double>(arena, at_partial);

  // 1. Stable sort of row indices by group: rows keep their order inside a group, as in the CPU kernel.
  if (sorted) {
    int64_t* rows = part<int64_t>(arena, at_rows);
    iota_kernel<<<grid_x(ceil_div(n, kFlatThreads)), kFlatThreads, 0, stream>>>(rows, n);
    PG_CUDA_CHECK_LAUNCH();
    PG_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(part<void>(arena, at_sort_temp), sort_temp_bytes, keys_in,
                                                  sorted_keys, rows, perm, n, 0, end_bit, stream));
  }
  offsets_kernel<<<grid_x(ceil_div(G + 1, kFlatThreads)), kFlatThreads, 0, stream>>>(sorted_keys, n, G, offsets);
  PG_CUDA_CHECK_LAUNCH();

  const unsigned group_blocks = grid_x(G);
  if (dense) {
    // 2. Work items (pieces) and partial-tile slots per group.
    plan_kernel<<<grid_x(ceil_div(G + 1, kFlatThreads)), kFlatThreads, 0, stream>>>(offsets, G, piece_rows, pieces,
                                                                                    slots);
    PG_CUDA_CHECK_LAUNCH();
    PG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(part<void>(arena, at_scan_temp), scan_temp_bytes, pieces, item_start,
                                                G + 1, stream));
    PG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(part<void>(arena, at_scan_temp), scan_temp_bytes, slots, slot_start,
                                                G + 1, stream));

    // 3. Shift and gather. The raw piece sums of groups without data go into piece_sums, which step 4 overwrites.
    const dim3 colsum_grid(grid_x(ceil_div(d, kColThreadsX)), grid_y(n_items_max));
    const dim3 colsum_block(kColThreadsX, kColThreadsY);
    colsum_kernel<<<colsum_grid, colsum_block, 0, stream>>>(raw_rows<Tag>{x, perm}, d, offsets, item_start, G,
                                                            piece_rows, n_items_max, st.count, piece_sums);
    PG_CUDA_CHECK_LAUNCH();
    shift_kernel<C>
        <<<group_blocks, kGroupThreads, 0, stream>>>(piece_sums, item_start, offsets, st.count, st.mean, G, d, shift);
    PG_CUDA_CHECK_LAUNCH();
    gather_kernel<Tag><<<dim3(grid_x(ceil_div(ld, kColThreadsX)), grid_y(ceil_div(n, kColThreadsY))),
                         dim3(kColThreadsX, kColThreadsY), 0, stream>>>(x, perm, sorted_keys, shift, n, d, ld, y);
    PG_CUDA_CHECK_LAUNCH();

    // 4. δ and dμ per group.
    colsum_kernel<<<colsum_grid, colsum_block, 0, stream>>>(shifted_rows<C>{y, ld}, d, offsets, item_start, G,
                                                            piece_rows, n_items_max, nullptr, piece_sums);
    PG_CUDA_CHECK_LAUNCH();
    delta_kernel<C><<<group_blocks, kGroupThreads, 0, stream>>>(piece_sums, item_start, offsets, st.count, st.mean,
                                                                shift, G, d, delta, dmu);
    PG_CUDA_CHECK_LAUNCH();

    // 5. Scatter and Chan's merge of m2 (reads the old count).
    syrk_kernel<C><<<dim3(static_cast<unsigned>(n_tiles), grid_y(n_items_max)), kSyrkThreads, 0, stream>>>(
        y, ld, d, nt, offsets, item_start, slot_start, G, piece_rows, n_items_max, st.count, delta, dmu, st.m2,
        partial);
    PG_CUDA_CHECK_LAUNCH();
    if (n_slots_max > 0) {
      const int64_t reduce_blocks = n_tiles * (kTile * kTile / kReduceThreads);
      reduce_kernel<<<dim3(static_cast<unsigned>(reduce_blocks), grid_y(n_slots_max)), kReduceThreads, 0, stream>>>(
          partial, slot_start, offsets, st.count, delta, dmu, G, d, nt, n_slots_max, st.m2);
      PG_CUDA_CHECK_LAUNCH();
    }
  }

  // 6. Mean and count (with d == 0 only the counts change, as on the CPU).
  mean_count_kernel<C><<<group_blocks, kGroupThreads, 0, stream>>>(offsets, shift, delta, dmu, G, d, st.count, st.mean);
  PG_CUDA_CHECK_LAUNCH();
  arena.release();
}

}  // namespace

void covariance_update_cuda(const MatrixView& x, const int64_t* groups, CovState state, std::uintptr_t stream) {
  PG_CHECK(x.cols == state.dim, "x has ", x.cols, " features but the accumulator was built for ", state.dim);
  PG_CHECK(state.n_groups >= 1, "n_groups must be >= 1");
  PG_CHECK(x.rows >= 0, "x has a negative number of rows (", x.rows, ")");
  if (x.rows == 0) return;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(x.dtype, [&](auto tag) { update_impl<decltype(tag)>(x, groups, state, s); });
}

}  // namespace pg
