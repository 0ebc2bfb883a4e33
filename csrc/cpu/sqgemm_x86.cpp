// x86 kernels of sqgemm_accumulate (see common/sqgemm.h): the register-tile kernel of sqgemm_kernel.inc compiled
// twice, for AVX-512 (tiles of R rows × NV vectors of 16 columns, NV ≤ 4, R·NV ≤ 24 of the 32 zmm registers) and for
// AVX2 + FMA (NV ≤ 2 vectors of 8 columns, R·NV ≤ 12 of the 16 ymm registers), and the run-time choice between them.
// Only the functions of each ISA's namespace carry its target attribute, so the rest of the module keeps the
// baseline ISA and neither ISA's instructions run unless the CPU has them.
#include "common/sqgemm.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PG_SQGEMM_X86 1
#endif

namespace pg {

namespace {

const char* const kIsaNames[] = {"none", "avx2", "avx512"};

#ifdef PG_SQGEMM_X86

bool cpu_has_avx512() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  }();
  return ok;
}

bool cpu_has_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

struct Operands {
  int64_t k;
  const float* s;
  int64_t s_r, s_k;
  const float* v;
  int64_t ldv;
  float* acc;
  int64_t ld_acc;
  // S packed in panels (see pack_panel): panel_k = its full K (0: S read through s_r / s_k), k0 = the chunk's start
  int64_t panel_k = 0, k0 = 0;
};

// The phase of a K chunk: the only chunk, the first, a middle one, or the last.
enum class Phase { kOnly, kFirst, kMiddle, kLast };

namespace avx512 {

#define PG_SQGEMM_TARGET __attribute__((target("avx512f,avx512dq")))

struct Isa {
  using Vec = __m512;
  using Mask = __mmask16;
  struct Sq {  // the squares' float64 sums, lanes 0-7 and 8-15
    __m512d lo, hi;
  };
  static constexpr int kLanes = 16;
  static constexpr int kMaxNv = 4;  // column blocks of 64
  static constexpr int tile_rows(int nv) { return nv == 1 ? 24 : nv == 2 ? 12 : nv == 3 ? 8 : 6; }

  PG_SQGEMM_TARGET static Mask first(int n) { return static_cast<Mask>((1u << n) - 1u); }  // lanes [0, n)
  PG_SQGEMM_TARGET static Vec zero() { return _mm512_setzero_ps(); }
  PG_SQGEMM_TARGET static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  PG_SQGEMM_TARGET static Vec maskload(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  PG_SQGEMM_TARGET static void store(float* p, Vec x) { _mm512_storeu_ps(p, x); }
  PG_SQGEMM_TARGET static void maskstore(float* p, Mask m, Vec x) { _mm512_mask_storeu_ps(p, m, x); }
  PG_SQGEMM_TARGET static Vec set1(float x) { return _mm512_set1_ps(x); }
  PG_SQGEMM_TARGET static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  PG_SQGEMM_TARGET static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  PG_SQGEMM_TARGET static Sq sq_zero() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  PG_SQGEMM_TARGET static void sq_add(Sq& sq, Vec q) {
    sq.lo = _mm512_add_pd(sq.lo, _mm512_cvtps_pd(_mm512_castps512_ps256(q)));
    sq.hi = _mm512_add_pd(sq.hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(q, 1)));
  }
  PG_SQGEMM_TARGET static double sq_sum(const Sq& sq) { return _mm512_reduce_add_pd(_mm512_add_pd(sq.lo, sq.hi)); }
};

#include "cpu/sqgemm_kernel.inc"

#undef PG_SQGEMM_TARGET

}  // namespace avx512

namespace avx2 {

#define PG_SQGEMM_TARGET __attribute__((target("avx2,fma")))

struct Isa {
  using Vec = __m256;
  using Mask = __m256i;  // all ones in the lanes to load / store
  struct Sq {            // the squares' float64 sums, lanes 0-3 and 4-7
    __m256d lo, hi;
  };
  static constexpr int kLanes = 8;
  static constexpr int kMaxNv = 2;  // column blocks of 16: R·NV accumulators + NV loads + 1 broadcast ≤ 16 registers
  static constexpr int tile_rows(int nv) { return nv == 1 ? 12 : 6; }

  PG_SQGEMM_TARGET static Mask first(int n) {  // lanes [0, n)
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  PG_SQGEMM_TARGET static Vec zero() { return _mm256_setzero_ps(); }
  PG_SQGEMM_TARGET static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  PG_SQGEMM_TARGET static Vec maskload(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }
  PG_SQGEMM_TARGET static void store(float* p, Vec x) { _mm256_storeu_ps(p, x); }
  PG_SQGEMM_TARGET static void maskstore(float* p, Mask m, Vec x) { _mm256_maskstore_ps(p, m, x); }
  PG_SQGEMM_TARGET static Vec set1(float x) { return _mm256_set1_ps(x); }
  PG_SQGEMM_TARGET static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  PG_SQGEMM_TARGET static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  PG_SQGEMM_TARGET static Sq sq_zero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  PG_SQGEMM_TARGET static void sq_add(Sq& sq, Vec q) {
    sq.lo = _mm256_add_pd(sq.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(q)));
    sq.hi = _mm256_add_pd(sq.hi, _mm256_cvtps_pd(_mm256_extractf128_ps(q, 1)));
  }
  PG_SQGEMM_TARGET static double sq_sum(const Sq& sq) {
    const __m256d x = _mm256_add_pd(sq.lo, sq.hi);
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
  }
};

#include "cpu/sqgemm_kernel.inc"

#undef PG_SQGEMM_TARGET

}  // namespace avx2

#else

bool cpu_has_avx512() {
  return false;
}

bool cpu_has_avx2() {
  return false;
}

#endif

bool cpu_has(SqgemmIsa isa) {
  switch (isa) {
    case SqgemmIsa::avx512:
      return cpu_has_avx512();
    case SqgemmIsa::avx2:
      return cpu_has_avx2();
    case SqgemmIsa::none:
      return true;
  }
  return false;
}

const char* cpu_needs(SqgemmIsa isa) {
  return isa == SqgemmIsa::avx512 ? "AVX-512 F and DQ" : "AVX2 and FMA";
}

// The ISA in use; -1 until set (the best one)
std::atomic<int> g_isa{-1};

}  // namespace

const char* sqgemm_isa_name(SqgemmIsa isa) {
  const int i = static_cast<int>(isa);
  return i >= 0 && i <= 2 ? kIsaNames[i] : "unknown";
}

SqgemmIsa sqgemm_best_isa() {
  return cpu_has_avx512() ? SqgemmIsa::avx512 : cpu_has_avx2() ? SqgemmIsa::avx2 : SqgemmIsa::none;
}

// AVX2 is not the default: on the one CPU measured (an AVX-512 Xeon running the AVX2 kernel), it beat per-sample
// BLAS on convolution shapes by 10-15% but lost to it by 15-50% on a T = 128, 128 -> 512 linear map.
SqgemmIsa sqgemm_default_isa() {
  return cpu_has_avx512() ? SqgemmIsa::avx512 : SqgemmIsa::none;
}

SqgemmIsa sqgemm_isa() {
  const int i = g_isa.load(std::memory_order_relaxed);
  return i < 0 ? sqgemm_default_isa() : static_cast<SqgemmIsa>(i);
}

SqgemmIsa sqgemm_set_isa(SqgemmIsa isa) {
  const int i = static_cast<int>(isa);
  if (i < 0 || i > 2) throw std::invalid_argument("sqgemm_set_isa: unknown ISA " + std::to_string(i));
  if (!cpu_has(isa)) {
    std::string msg = std::string("sqgemm_set_isa: this CPU lacks '") + sqgemm_isa_name(isa) + "' (" + cpu_needs(isa) +
                      "); allowed here:";
    const char* sep = " '";
    for (SqgemmIsa other : {SqgemmIsa::avx512, SqgemmIsa::avx2, SqgemmIsa::none}) {
      if (cpu_has(other)) {
        msg += sep + std::string(sqgemm_isa_name(other)) + "'";
        sep = ", '";
      }
    }
    throw std::invalid_argument(msg);
  }
  const int prev = g_isa.exchange(i, std::memory_order_relaxed);
  return prev < 0 ? sqgemm_default_isa() : static_cast<SqgemmIsa>(prev);
}

bool sqgemm_available() {
  return sqgemm_isa() != SqgemmIsa::none;
}

double sqgemm_accumulate(SqgemmIsa isa, int64_t rows, int64_t cols, int64_t k, const float* s, int64_t s_r, int64_t s_k,
                         const float* v, int64_t ldv, float* acc, int64_t ld_acc) {
#ifdef PG_SQGEMM_X86
  if (isa != SqgemmIsa::none && cpu_has(isa)) {
    if (rows <= 0 || cols <= 0) return 0.0;
    const Operands o{k, s, s_r, s_k, v, ldv, acc, ld_acc};
    return isa == SqgemmIsa::avx512 ? avx512::run(rows, cols, o) : avx2::run(rows, cols, o);
  }
  throw std::logic_error(std::string("sqgemm_accumulate: no kernel for ISA ") + sqgemm_isa_name(isa) + " on this CPU");
#else
  (void)isa, (void)rows, (void)cols, (void)k, (void)s, (void)s_r, (void)s_k, (void)v, (void)ldv, (void)acc,
      (void)ld_acc;
  throw std::logic_error("sqgemm_accumulate needs an x86-64 CPU with AVX2 + FMA or AVX-512");
#endif
}

double sqgemm_accumulate(int64_t rows, int64_t cols, int64_t k, const float* s, int64_t s_r, int64_t s_k,
                         const float* v, int64_t ldv, float* acc, int64_t ld_acc) {
  return sqgemm_accumulate(sqgemm_isa(), rows, cols, k, s, s_r, s_k, v, ldv, acc, ld_acc);
}

}  // namespace pg
