// AVX-512 kernel of sqgemm_accumulate (see common/sqgemm.h). Register tiles of R rows × NV vectors of 16 columns
// (R·NV ≤ 24 accumulators): for each k, NV vector loads of V's row k and R broadcasts of S's column k feed R·NV FMAs.
// Compiled per function for AVX-512 (target attributes), so the rest of the module keeps the baseline ISA.
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

#define PG_AVX512 __attribute__((target("avx512f,avx512dq")))

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

// One tile: rows [0, R) of s (already offset), NV vectors of columns of v / acc (already offset), over k in
// [0, o.k). The last vector loads and stores under `tail` (its columns beyond cols are zero in M, left alone in acc).
// With K split into chunks, the partial sums go through `part` (the tile's rows in the column block's scratch,
// leading dimension ld_part): Init = start from them, Final = finish (square, sum, add into acc) instead of storing.
template <int NV, int R, bool Init, bool Final>
PG_AVX512 inline void tile(const Operands& o, __mmask16 tail, float* part, int64_t ld_part, __m512d& sq_lo,
                           __m512d& sq_hi) {
  __m512 c[R][NV];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[r][j] = Init ? _mm512_loadu_ps(part + r * ld_part + 16 * j) : _mm512_setzero_ps();
  }
  const float* vk = o.v;
  const float* sk = o.s;
  for (int64_t k = 0; k < o.k; ++k, vk += o.ldv, sk += o.s_k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      b[j] = j == NV - 1 ? _mm512_maskz_loadu_ps(tail, vk + 16 * j) : _mm512_loadu_ps(vk + 16 * j);
    }
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(sk[r * o.s_r]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[r][j] = _mm512_fmadd_ps(a, b[j], c[r][j]);
    }
  }
  if constexpr (!Final) {
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(part + r * ld_part + 16 * j, c[r][j]);
    }
    return;
  }
  __m512 q = _mm512_setzero_ps();
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
    float* dst = o.acc + r * o.ld_acc;
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      q = _mm512_fmadd_ps(c[r][j], c[r][j], q);
      if (j == NV - 1) {
        _mm512_mask_storeu_ps(dst + 16 * j, tail, _mm512_add_ps(_mm512_maskz_loadu_ps(tail, dst + 16 * j), c[r][j]));
      } else {
        _mm512_storeu_ps(dst + 16 * j, _mm512_add_ps(_mm512_loadu_ps(dst + 16 * j), c[r][j]));
      }
    }
  }
  sq_lo = _mm512_add_pd(sq_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(q)));
  sq_hi = _mm512_add_pd(sq_hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(q, 1)));
}

// The phase of a K chunk: the only chunk, the first, a middle one, or the last.
enum class Phase { kOnly, kFirst, kMiddle, kLast };

template <int NV, int R, Phase P>
PG_AVX512 inline void tile_phase(const Operands& o, __mmask16 tail, float* part, int64_t ld_part, __m512d& lo,
                                 __m512d& hi) {
  constexpr bool init = P == Phase::kMiddle || P == Phase::kLast;
  constexpr bool final = P == Phase::kOnly || P == Phase::kLast;
  tile<NV, R, init, final>(o, tail, part, ld_part, lo, hi);
}

// The last `rem` (< R) rows of a column block, by the tile of exactly that many rows.
template <int NV, int R, Phase P>
PG_AVX512 inline void tail_rows(int rem, const Operands& o, __mmask16 tail, float* part, int64_t ld_part, __m512d& lo,
                                __m512d& hi) {
  if constexpr (R >= 1) {
    if (rem == R) {
      tile_phase<NV, R, P>(o, tail, part, ld_part, lo, hi);
    } else {
      tail_rows<NV, R - 1, P>(rem, o, tail, part, ld_part, lo, hi);
    }
  }
}

// All rows of one column block of NV vectors over one K chunk: tiles of R rows, then the remainder.
template <int NV, int R, Phase P>
PG_AVX512 void rows_pass(int64_t rows, Operands o, __mmask16 tail, float* part, __m512d& lo, __m512d& hi) {
  const float* s0 = o.s;
  float* acc0 = o.acc;
  constexpr int64_t ld_part = 16 * NV;
  const int64_t s_r = o.s_r;
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    if (o.panel_k != 0) {  // rows [r0, r0 + rb) are the panel at r0·K: [K, rb], entry (r, k) at k·rb + r - r0
      const int64_t rb = rows - r0 < R ? rows - r0 : R;
      o.s = s0 + r0 * o.panel_k + o.k0 * rb;
      o.s_r = 1;
      o.s_k = rb;
    } else {
      o.s = s0 + r0 * s_r;
    }
    o.acc = acc0 + r0 * o.ld_acc;
    float* p = part + r0 * ld_part;
    if (r0 + R <= rows) {
      tile_phase<NV, R, P>(o, tail, p, ld_part, lo, hi);
    } else {
      tail_rows<NV, R - 1, P>(static_cast<int>(rows - r0), o, tail, p, ld_part, lo, hi);
    }
  }
}

// K chunks of a column block of nv vectors: chunk × 16·nv floats of V within 32 KiB of L1. K is split when it
// exceeds 1.5 chunks.
constexpr int64_t chunk_k(int nv) {
  return 8192 / (16 * nv);
}
constexpr bool split_k(int64_t k, int nv) {
  return k > chunk_k(nv) + chunk_k(nv) / 2;
}

// One column block over all of K, in chunks (chunk_k), partial sums kept in `part` [rows, 16·NV] between chunks.
template <int NV, int R>
PG_AVX512 void column_block(int64_t rows, const Operands& o, __mmask16 tail, float* part, __m512d& lo, __m512d& hi) {
  constexpr int64_t chunk = chunk_k(NV);
  if (!split_k(o.k, NV)) {
    rows_pass<NV, R, Phase::kOnly>(rows, o, tail, part, lo, hi);
    return;
  }
  for (int64_t k0 = 0; k0 < o.k; k0 += chunk) {
    Operands c = o;
    c.k = o.k - k0 < chunk ? o.k - k0 : chunk;
    c.v = o.v + k0 * o.ldv;
    if (o.panel_k != 0) {
      c.k0 = k0;
    } else {
      c.s = o.s + k0 * o.s_k;
    }
    if (k0 == 0) {
      rows_pass<NV, R, Phase::kFirst>(rows, c, tail, part, lo, hi);
    } else if (k0 + chunk >= o.k) {
      rows_pass<NV, R, Phase::kLast>(rows, c, tail, part, lo, hi);
    } else {
      rows_pass<NV, R, Phase::kMiddle>(rows, c, tail, part, lo, hi);
    }
  }
}

// S [rows, K] with rows contiguous (s_r = 1, a [T, d_in] input read down its columns) packed for tiles of R rows:
// rows [r0, r0 + rb) become a panel [K, rb] at out + r0·K, so each k's broadcasts are adjacent and every panel is
// read front to back. Read in place, a column of such an input touches one line per row of the input, and at a
// power-of-two row length (2 KiB for 512 floats) those lines fall in 2 of L1's 64 sets and evict each other.
PG_AVX512 void pack_panel(int64_t rows, int64_t k, const float* s, int64_t s_k, int64_t r_tile, float* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += r_tile) {
    const int64_t rb = rows - r0 < r_tile ? rows - r0 : r_tile;
    const __mmask16 m0 = static_cast<__mmask16>(rb >= 16 ? 0xFFFFu : (1u << rb) - 1u);
    const __mmask16 m1 = static_cast<__mmask16>(rb > 16 ? (1u << (rb - 16)) - 1u : 0u);
    const float* src = s + r0;
    float* dst = out + r0 * k;
    for (int64_t kk = 0; kk < k; ++kk, src += s_k, dst += rb) {
      _mm512_mask_storeu_ps(dst, m0, _mm512_maskz_loadu_ps(m0, src));
      if (m1 != 0) _mm512_mask_storeu_ps(dst + 16, m1, _mm512_maskz_loadu_ps(m1, src + 16));
    }
  }
}

// Rows of a tile for NV vectors of columns.
constexpr int64_t tile_rows(int nv) {
  return nv == 1 ? 24 : nv == 2 ? 12 : nv == 3 ? 8 : 6;
}

// Each column block of V is also copied into rows of exactly its width when V's rows are longer, for the same
// reason.
PG_AVX512 double run(int64_t rows, int64_t cols, Operands base) {
  thread_local std::vector<float> scratch, s_pack, v_pack;
  const bool panel = base.s_r == 1 && base.s_k != 1 && base.k > 1;
  int64_t packed_for = 0;  // the tile rows of the panels in s_pack
  const float* s_in = base.s;
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  for (int64_t c0 = 0; c0 < cols; c0 += 64) {
    const int64_t width = cols - c0 < 64 ? cols - c0 : 64;
    const int nv = static_cast<int>((width + 15) / 16);
    const int last = static_cast<int>(width - 16 * (nv - 1));
    const __mmask16 tail = static_cast<__mmask16>((1u << last) - 1u);
    Operands o = base;
    o.v = base.v + c0;
    o.acc = base.acc + c0;
    if (panel && packed_for != tile_rows(nv)) {
      packed_for = tile_rows(nv);
      s_pack.resize(static_cast<size_t>(rows * base.k));
      pack_panel(rows, base.k, s_in, base.s_k, packed_for, s_pack.data());
      o.s = s_pack.data();
      o.panel_k = base.k;
    } else if (panel) {
      o.s = s_pack.data();
      o.panel_k = base.k;
    }
    if (base.ldv != width && base.k > 1) {
      v_pack.resize(static_cast<size_t>(base.k * width));
      for (int64_t k = 0; k < base.k; ++k) {
        const float* src = o.v + k * base.ldv;
        std::copy(src, src + width, v_pack.data() + k * width);
      }
      o.v = v_pack.data();
      o.ldv = width;
    }
    if (split_k(o.k, nv)) scratch.resize(static_cast<size_t>(rows * 16 * nv));  // the partial sums
    float* part = scratch.data();
    switch (nv) {
      case 1:
        column_block<1, 24>(rows, o, tail, part, lo, hi);
        break;
      case 2:
        column_block<2, 12>(rows, o, tail, part, lo, hi);
        break;
      case 3:
        column_block<3, 8>(rows, o, tail, part, lo, hi);
        break;
      default:
        column_block<4, 6>(rows, o, tail, part, lo, hi);
        break;
    }
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

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
  return run(rows, cols, Operands{k, s, s_r, s_k, v, ldv, acc, ld_acc});
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
