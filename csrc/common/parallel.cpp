#include "common/parallel.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>
#include <vector>

#include "common/blas.h"

namespace pg {

namespace {
std::atomic<int> g_num_threads{0};
}

int get_num_threads() {
  int n = g_num_threads.load();
  if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return n;
}

void set_num_threads(int n) {
  PG_CHECK(n >= 0, "num_threads must be >= 0 (0 = all cores), got ", n);
  g_num_threads.store(n);
}

int parallel_ranges(int64_t n, int64_t min_per_thread) {
  if (n <= 0) return 1;
  const int64_t by_size = std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread));
  return static_cast<int>(std::min<int64_t>(get_num_threads(), by_size));
}

void parallel_for(int64_t n, int64_t min_per_thread, const std::function<void(int, int64_t, int64_t)>& fn) {
  const int t = parallel_ranges(n, min_per_thread);
  if (t <= 1) {
    fn(0, 0, std::max<int64_t>(n, 0));
    return;
  }
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(t);
  workers.reserve(t - 1);
  auto run = [&](int i) {
    const int64_t b = n * i / t, e = n * (i + 1) / t;
    try {
      fn(i, b, e);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  };
  for (int i = 1; i < t; ++i) workers.emplace_back(run, i);
  run(0);
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

int blas_get_num_threads() {
  return scipy_openblas_get_num_threads();
}
void blas_set_num_threads(int n) {
  scipy_openblas_set_num_threads(n);
}
const char* blas_config() {
  return scipy_openblas_get_config();
}

}  // namespace pg
