// Element types accepted by the kernels and the per-element conversions shared by CPU and CUDA code.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PG_HD __host__ __device__ __forceinline__
#else
#define PG_HD inline
#endif

namespace pg {

/// Element type codes used across the bindings (stable: Python passes them as ints).
enum class DType : int { float16 = 0, bfloat16 = 1, float32 = 2, float64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::float16:
      return "float16";
    case DType::bfloat16:
      return "bfloat16";
    case DType::float32:
      return "float32";
    case DType::float64:
      return "float64";
  }
  return "unknown";
}

inline int dtype_size(DType t) {
  switch (t) {
    case DType::float16:
    case DType::bfloat16:
      return 2;
    case DType::float32:
      return 4;
    case DType::float64:
      return 8;
  }
  return 0;
}

/// IEEE binary16 bits -> float, exact (subnormals, inf and nan included).
PG_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;  // signed zero
  } else {
    // Subnormal half: renormalise the mantissa.
    int shift = 0;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      ++shift;
    }
    man &= 0x3ffu;
    bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | (man << 13);
  }
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(bits);
#else
  std::memcpy(&f, &bits, sizeof(f));
#endif
  return f;
}

/// bfloat16 bits -> float, exact.
PG_HD float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(bits);
#else
  std::memcpy(&f, &bits, sizeof(f));
#endif
  return f;
}

/// Storage tags: load<Tag>(ptr) converts one element to the compute type.
struct f16_tag {
  using storage = uint16_t;
  using compute = float;
};
struct bf16_tag {
  using storage = uint16_t;
  using compute = float;
};
struct f32_tag {
  using storage = float;
  using compute = float;
};
struct f64_tag {
  using storage = double;
  using compute = double;
};

PG_HD float load(f16_tag, const uint16_t* p) {
  return half_bits_to_float(*p);
}
PG_HD float load(bf16_tag, const uint16_t* p) {
  return bf16_bits_to_float(*p);
}
PG_HD float load(f32_tag, const float* p) {
  return *p;
}
PG_HD double load(f64_tag, const double* p) {
  return *p;
}

/// Calls f(tag) with the storage tag of `t`.
template <typename F>
auto dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::float16:
      return f(f16_tag{});
    case DType::bfloat16:
      return f(bf16_tag{});
    case DType::float32:
      return f(f32_tag{});
    case DType::float64:
      break;
  }
  return f(f64_tag{});
}

/// A strided 2-D view of a host or device array, strides in elements (may be 0 or negative).
struct MatrixView {
  const void* data = nullptr;  // [rows, cols]
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;
  int64_t col_stride = 1;
  DType dtype = DType::float32;

  template <typename S>
  PG_HD const S* row(int64_t r) const {
    return static_cast<const S*>(data) + r * row_stride;
  }
};

}  // namespace pg
