#include "common/parallel.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include <unistd.h>

#include "common/blas.h"

namespace pg {

namespace {
std::atomic<int> g_num_threads{0};

// An OpenMP runtime already in the process (torch's libgomp), whose threads run parallel_for's ranges instead of
// threads started per call: its workers spin for a while after each of its parallel regions, and threads of our own
// started meanwhile would share the cores with them.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpQuery = int (*)();
struct OpenMpRuntime {
  GompParallel parallel = nullptr;
  OmpQuery thread_num = nullptr, num_threads = nullptr;
  pid_t pid = 0;  // libgomp's pool does not survive fork(): a forked child uses threads of our own
};
std::atomic<const OpenMpRuntime*> g_openmp{nullptr};
OpenMpRuntime g_openmp_slot;

struct Job {
  int ranges;
  int64_t n;
  const std::function<void(int, int64_t, int64_t)>* fn;
  std::vector<std::exception_ptr>* errors;
  const OpenMpRuntime* rt;
};

void run_range(const Job& j, int i) {
  const int64_t b = j.n * i / j.ranges, e = j.n * (i + 1) / j.ranges;
  try {
    (*j.fn)(i, b, e);
  } catch (...) {
    (*j.errors)[i] = std::current_exception();
  }
}

// Each member of the team runs ranges me, me + team, ...: all ranges run whatever team size the runtime gives
// (one thread when called from inside another parallel region).
void openmp_body(void* p) {
  const Job& j = *static_cast<const Job*>(p);
  const int me = j.rt->thread_num(), team = std::max(1, j.rt->num_threads());
  for (int i = me; i < j.ranges; i += team) run_range(j, i);
}
}  // namespace

bool set_openmp_runtime(std::uintptr_t gomp_parallel, std::uintptr_t omp_get_thread_num,
                        std::uintptr_t omp_get_num_threads) {
  const bool had = g_openmp.load() != nullptr;
  if (gomp_parallel == 0 || omp_get_thread_num == 0 || omp_get_num_threads == 0) {
    g_openmp.store(nullptr);
    return had;
  }
  PG_CHECK(!had, "an OpenMP runtime is already set; clear it first (all zeros)");
  g_openmp_slot.parallel = reinterpret_cast<GompParallel>(gomp_parallel);
  g_openmp_slot.thread_num = reinterpret_cast<OmpQuery>(omp_get_thread_num);
  g_openmp_slot.num_threads = reinterpret_cast<OmpQuery>(omp_get_num_threads);
  g_openmp_slot.pid = getpid();
  g_openmp.store(&g_openmp_slot);
  return had;
}

bool openmp_runtime_set() {
  return g_openmp.load() != nullptr;
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
  std::vector<std::exception_ptr> errors(t);
  const OpenMpRuntime* rt = g_openmp.load();
  if (rt != nullptr && rt->pid != getpid()) rt = nullptr;
  const Job job{t, n, &fn, &errors, rt};
  if (job.rt != nullptr) {
    job.rt->parallel(openmp_body, const_cast<Job*>(&job), static_cast<unsigned>(t), 0u);
  } else {
    std::vector<std::thread> workers;
    workers.reserve(t - 1);
    for (int i = 1; i < t; ++i) workers.emplace_back([&job, i] { run_range(job, i); });
    run_range(job, 0);
    for (auto& w : workers) w.join();
  }
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
