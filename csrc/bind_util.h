// Helpers shared by the pybind11 wrappers (bindings.cpp and bind_<op>.cpp): host arrays to kernel views, checked.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "common/check.h"
#include "common/dtype.h"

namespace pg_bind {

namespace py = pybind11;
using pg::DType;
using pg::MatrixView;

// dtype of a host array; bfloat16 arrives as a 2-byte integer view of a torch tensor with `bf16` set.
inline DType host_dtype(const py::array& a, bool bf16, const char* name) {
  const char kind = a.dtype().kind();
  const auto size = a.itemsize();
  if (bf16) {
    PG_CHECK_TYPE((kind == 'i' || kind == 'u') && size == 2, name,
                  ": a bfloat16 buffer must be passed as a 2-byte integer view");
    return DType::bfloat16;
  }
  if (kind == 'f' && size == 2) return DType::float16;
  if (kind == 'f' && size == 4) return DType::float32;
  if (kind == 'f' && size == 8) return DType::float64;
  throw pg::type_error(
      pg::str_cat(name, " must be float16, bfloat16, float32 or float64, got dtype ", std::string(py::str(a.dtype()))));
}

// Stride of dimension `dim` of a host array in elements (its byte stride must be a multiple of the item size).
inline int64_t element_stride(const py::array& a, int dim, const char* name) {
  const auto item = a.itemsize();
  PG_CHECK(a.strides(dim) % item == 0, name, " has strides that are not a multiple of its item size");
  return a.strides(dim) / item;
}

inline MatrixView host_matrix(const py::array& a, bool bf16, const char* name) {
  PG_CHECK(a.ndim() == 2, name, " must be 2-D [n, d], got ", a.ndim(), " dimension(s)");
  MatrixView v;
  v.dtype = host_dtype(a, bf16, name);
  v.data = a.data();
  v.rows = a.shape(0);
  v.cols = a.shape(1);
  v.row_stride = element_stride(a, 0, name);
  v.col_stride = element_stride(a, 1, name);
  return v;
}

template <typename T>
T* mutable_data(py::array& a, const char* name, std::initializer_list<py::ssize_t> shape) {
  PG_CHECK_TYPE(py::isinstance<py::array_t<T>>(a) && a.dtype().is(py::dtype::of<T>()), name, " has the wrong dtype ",
                std::string(py::str(a.dtype())));
  PG_CHECK(a.writeable(), name, " must be writeable");
  PG_CHECK(a.flags() & py::array::c_style, name, " must be C-contiguous");
  PG_CHECK(static_cast<size_t>(a.ndim()) == shape.size(), name, " must have ", shape.size(), " dimensions");
  size_t i = 0;
  for (auto s : shape) {
    PG_CHECK(a.shape(i) == s, name, " has shape[", i, "] = ", a.shape(i), ", expected ", s);
    ++i;
  }
  return static_cast<T*>(a.mutable_data());
}

// int64 groups [n] (C-contiguous) or None; `keep` holds the array alive.
inline const int64_t* host_groups(const py::object& groups, int64_t n, py::array& keep) {
  if (groups.is_none()) return nullptr;
  keep = py::array::ensure(groups);
  PG_CHECK_TYPE(keep && keep.dtype().is(py::dtype::of<int64_t>()), "groups must be an int64 array");
  PG_CHECK(keep.ndim() == 1 && keep.shape(0) == n, "groups must have shape [", n, "]");
  PG_CHECK(keep.flags() & py::array::c_style, "groups must be C-contiguous");
  return static_cast<const int64_t*>(keep.data());
}

// Allocates an output in the compute type of `dt` (float32 for the 2-byte types).
inline py::array compute_array(DType dt, std::vector<py::ssize_t> shape) {
  if (dt == DType::float64) return py::array_t<double>(shape);
  return py::array_t<float>(shape);
}

// A 2-D view of device memory described by pointer, shape, strides (in elements) and a dtype code.
inline MatrixView device_view(std::uintptr_t ptr, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                              int dtype) {
  PG_CHECK(dtype >= 0 && dtype <= 3, "unknown dtype code ", dtype);
  MatrixView v;
  v.data = reinterpret_cast<const void*>(ptr);
  v.rows = rows;
  v.cols = cols;
  v.row_stride = row_stride;
  v.col_stride = col_stride;
  v.dtype = static_cast<DType>(dtype);
  return v;
}

}  // namespace pg_bind
