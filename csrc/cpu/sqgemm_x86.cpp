// AVX-512 kernel of sqgemm_accumulate (see common/sqgemm.h): the register-tile kernel of sqgemm_kernel.inc compiled
// for AVX-512 (tiles of R rows × NV vectors of 16 columns, NV ≤ 4, R·NV ≤ 24 of the 32 zmm registers). Only the
// functions of its namespace carry the AVX-512 target attribute, so the rest of the module keeps the baseline ISA.
#include "common/sqgemm.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PG_SQGEMM_X86 1
#endif

namespace pg {

#ifdef PG_SQGEMM_X86

namespace {

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

}  // namespace

bool sqgemm_supported() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  }();
  return ok;
}

double sqgemm_accumulate(int64_t rows, int64_t cols, int64_t k, const float* s, int64_t s_r, int64_t s_k,
                         const float* v, int64_t ldv, float* acc, int64_t ld_acc) {
  if (rows <= 0 || cols <= 0) return 0.0;
  return avx512::run(rows, cols, Operands{k, s, s_r, s_k, v, ldv, acc, ld_acc});
}

#else

bool sqgemm_supported() {
  return false;
}

double sqgemm_accumulate(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                         int64_t) {
  throw std::logic_error("sqgemm_accumulate needs an x86-64 CPU with AVX-512");
}

#endif

namespace {
std::atomic<bool> g_enabled{true};
}  // namespace

bool sqgemm_available() {
  return g_enabled.load(std::memory_order_relaxed) && sqgemm_supported();
}

bool sqgemm_set_enabled(bool enabled) {
  return g_enabled.exchange(enabled);
}

}  // namespace pg
