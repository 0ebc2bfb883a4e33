// A minimal fork-join helper. Where an OpenMP runtime is set (poisonguard.torch sets torch's libgomp), the ranges
// run as its parallel regions, on workers that are already spinning after torch's last operator. Otherwise threads
// are started per call and exit at once, so nothing spins between calls and OpenBLAS's own pool keeps the cores when
// it runs.
#pragma once

#include <cstdint>
#include <functional>

namespace pg {

/// Threads used by poisonguard's own loops (default: hardware concurrency).
int get_num_threads();
void set_num_threads(int n);

/// Calls fn(thread_index, begin, end) on `n_threads` contiguous ranges covering [0, n); runs inline when one range
/// suffices (n < min_per_thread * 2 or one thread). Exceptions thrown by fn are rethrown in the caller.
void parallel_for(int64_t n, int64_t min_per_thread, const std::function<void(int, int64_t, int64_t)>& fn);

/// Runs parallel_for's ranges on an OpenMP runtime already loaded in the process (addresses of its GOMP_parallel,
/// omp_get_thread_num and omp_get_num_threads; all zero = back to threads of our own). Returns whether one was set.
bool set_openmp_runtime(std::uintptr_t gomp_parallel, std::uintptr_t omp_get_thread_num,
                        std::uintptr_t omp_get_num_threads);
bool openmp_runtime_set();

/// The number of ranges parallel_for(n, min_per_thread, ...) will use.
int parallel_ranges(int64_t n, int64_t min_per_thread);

int blas_get_num_threads();
void blas_set_num_threads(int n);
const char* blas_config();

}  // namespace pg

namespace pg {

/// Calls fn(i) for every row i of a d x d upper triangle, rows paired (i, d-1-i) so threads get equal work.
template <typename F>
void for_upper_rows(int64_t d, F&& fn) {
  parallel_for((d + 1) / 2, 16, [&](int, int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      fn(k);
      if (d - 1 - k != k) fn(d - 1 - k);
    }
  });
}

/// While our own threads each call BLAS on their own blocks, OpenBLAS must run single-threaded in each of them (its
/// pool serialises concurrent callers, and its threaded level-3 routines synchronise by spinning). This OpenBLAS has
/// no per-thread setting, so the global count is lowered for the scope and restored after it.
struct SingleThreadedBlas {
  int previous;
  bool active;
  explicit SingleThreadedBlas(bool on) : previous(blas_get_num_threads()), active(on && previous > 1) {
    if (active) blas_set_num_threads(1);
  }
  ~SingleThreadedBlas() {
    if (active) blas_set_num_threads(previous);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
};

}  // namespace pg
