// pybind11 wrappers of the trim kernels; registered by PYBIND11_MODULE in bindings.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bind_util.h"
#include "trim.h"

namespace py = pybind11;

namespace {

using pg::DType;
using pg::LogitsView;

// A host array [B, C, P] (float32 / float64) as a strided view, no copy.
LogitsView host_logits(const py::array& a, const char* name) {
  PG_CHECK(a.ndim() == 3, name, " must be 3-D [batch, classes, positions], got ", a.ndim(), " dimension(s)");
  LogitsView v;
  v.dtype = pg_bind::host_dtype(a, false, name);
  v.data = a.data();
  v.batch = a.shape(0);
  v.classes = a.shape(1);
  v.positions = a.shape(2);
  v.stride_b = pg_bind::element_stride(a, 0, name);
  v.stride_c = pg_bind::element_stride(a, 1, name);
  v.stride_p = pg_bind::element_stride(a, 2, name);
  return v;
}

template <typename T>
const T* host_vector(const py::array& a, const char* name, int64_t n) {
  PG_CHECK_TYPE(a.dtype().is(py::dtype::of<T>()), name, " has dtype ", std::string(py::str(a.dtype())), ", expected ",
                std::string(py::str(py::dtype::of<T>())));
  PG_CHECK(a.ndim() == 1 && a.shape(0) == n, name, " must have shape [", n, "]");
  PG_CHECK(a.flags() & py::array::c_style, name, " must be C-contiguous");
  return static_cast<const T*>(a.data());
}

LogitsView device_logits(std::uintptr_t ptr, int64_t batch, int64_t classes, int64_t positions, int64_t sb, int64_t sc,
                         int64_t sp, int dtype) {
  PG_CHECK(dtype >= 0 && dtype <= 3, "unknown dtype code ", dtype);
  LogitsView v;
  v.data = reinterpret_cast<const void*>(ptr);
  v.batch = batch;
  v.classes = classes;
  v.positions = positions;
  v.stride_b = sb;
  v.stride_c = sc;
  v.stride_p = sp;
  v.dtype = static_cast<DType>(dtype);
  PG_CHECK(batch >= 0 && classes >= 1 && positions >= 1, "logits must have at least one class");
  return v;
}

}  // namespace

void pg_bind_trim(py::module_& m) {
  m.def(
      "trimmed_cross_entropy_forward",
      [](const py::array& logits, const py::array& target, int64_t ignore_index, int64_t k,
         const py::object& eager_grad, double eager_factor) {
        LogitsView v = host_logits(logits, "logits");
        const int64_t n = v.rows();
        const int64_t* t = host_vector<int64_t>(target, "target", n);
        LogitsView g;
        bool eager = false;
        if (!eager_grad.is_none()) {
          py::array ga = eager_grad;
          PG_CHECK(ga.writeable(), "eager_grad must be writeable");
          g = host_logits(ga, "eager_grad");
          eager = pg::trimmed_cross_entropy_eager_available(v, g);
        }
        py::array_t<double> loss(n), row_max(n), log_sum(n);
        py::array_t<uint8_t> keep(n);
        pg::TrimRows rows{loss.mutable_data(), row_max.mutable_data(), log_sum.mutable_data(), keep.mutable_data()};
        double total = 0.0;
        {
          py::gil_scoped_release nogil;
          total =
              pg::trimmed_cross_entropy_forward_cpu(v, t, ignore_index, k, rows, eager ? &g : nullptr, eager_factor);
        }
        return py::make_tuple(total, loss, row_max, log_sum, keep, eager);
      },
      py::arg("logits"), py::arg("target"), py::arg("ignore_index"), py::arg("k"), py::arg("eager_grad") = py::none(),
      py::arg("eager_factor") = 1.0,
      "(sum of kept losses, loss [n], row_max [n], log_sum [n] float64, keep [n] uint8, eager) for float32/float64 "
      "logits [B, C, P] (any strides) and int64 targets [B·P]; the k smallest losses of the valid rows are kept. "
      "eager: whether the gradient for a unit upstream gradient, (softmax − onehot) · eager_factor on the kept rows "
      "and 0 elsewhere, was also written into eager_grad (float32, unit class stride, more than 16 classes only).");

  m.def(
      "trimmed_cross_entropy_backward_eager",
      [](const py::array& keep, const py::array& scale, double factor, py::array grad) {
        PG_CHECK(grad.writeable(), "grad must be writeable");
        LogitsView g = host_logits(grad, "grad");
        const int64_t n = g.rows();
        PG_CHECK(scale.ndim() == 1 && (scale.shape(0) == 1 || scale.shape(0) == n), "scale must have shape [1] or [", n,
                 "]");
        const double* s = host_vector<double>(scale, "scale", scale.shape(0));
        pg::TrimRows rows{nullptr, nullptr, nullptr, const_cast<uint8_t*>(host_vector<uint8_t>(keep, "keep", n))};
        py::gil_scoped_release nogil;
        pg::trimmed_cross_entropy_backward_eager_cpu(rows, s, scale.shape(0) == 1 ? 0 : 1, factor, g);
      },
      py::arg("keep"), py::arg("scale"), py::arg("factor"), py::arg("grad"),
      "Scales in place a gradient written by trimmed_cross_entropy_forward (float32 [B, C, P]): kept rows times "
      "factor · scale (scale float64 [1] or [n]).");

  m.def(
      "trimmed_cross_entropy_backward",
      [](const py::array& logits, const py::array& target, const py::array& row_max, const py::array& log_sum,
         const py::array& keep, const py::array& scale, double factor, py::array grad) {
        LogitsView v = host_logits(logits, "logits");
        const int64_t n = v.rows();
        PG_CHECK(grad.writeable(), "grad must be writeable");
        LogitsView g = host_logits(grad, "grad");
        PG_CHECK(scale.ndim() == 1 && (scale.shape(0) == 1 || scale.shape(0) == n), "scale must have shape [1] or [", n,
                 "]");
        const double* s = host_vector<double>(scale, "scale", scale.shape(0));
        const int64_t s_stride = scale.shape(0) == 1 ? 0 : 1;
        pg::TrimRows rows{nullptr, const_cast<double*>(host_vector<double>(row_max, "row_max", n)),
                          const_cast<double*>(host_vector<double>(log_sum, "log_sum", n)),
                          const_cast<uint8_t*>(host_vector<uint8_t>(keep, "keep", n))};
        const int64_t* t = host_vector<int64_t>(target, "target", n);
        py::gil_scoped_release nogil;
        pg::trimmed_cross_entropy_backward_cpu(v, t, rows, s, s_stride, factor, g);
      },
      py::arg("logits"), py::arg("target"), py::arg("row_max"), py::arg("log_sum"), py::arg("keep"), py::arg("scale"),
      py::arg("factor"), py::arg("grad"),
      "Writes grad [B, C, P] (the logits' dtype, any strides) = (softmax − onehot) · factor · scale on kept rows, "
      "0 elsewhere; scale is float64 [1] or [n].");

  m.def(
      "trimmed_cross_entropy_forward_cuda",
      [](std::uintptr_t ptr, int64_t batch, int64_t classes, int64_t positions, int64_t sb, int64_t sc, int64_t sp,
         int dtype, std::uintptr_t target, int64_t ignore_index, int64_t k, std::uintptr_t loss, std::uintptr_t row_max,
         std::uintptr_t log_sum, std::uintptr_t keep, std::uintptr_t total, std::uintptr_t stream) {
        LogitsView v = device_logits(ptr, batch, classes, positions, sb, sc, sp, dtype);
        pg::TrimRows rows{reinterpret_cast<double*>(loss), reinterpret_cast<double*>(row_max),
                          reinterpret_cast<double*>(log_sum), reinterpret_cast<uint8_t*>(keep)};
        py::gil_scoped_release nogil;
        pg::trimmed_cross_entropy_forward_cuda(v, reinterpret_cast<const int64_t*>(target), ignore_index, k, rows,
                                               reinterpret_cast<double*>(total), stream);
      },
      py::arg("ptr"), py::arg("batch"), py::arg("classes"), py::arg("positions"), py::arg("stride_b"),
      py::arg("stride_c"), py::arg("stride_p"), py::arg("dtype"), py::arg("target"), py::arg("ignore_index"),
      py::arg("k"), py::arg("loss"), py::arg("row_max"), py::arg("log_sum"), py::arg("keep"), py::arg("total"),
      py::arg("stream"), "Device version of trimmed_cross_entropy_forward: CUDA pointers, strides in elements.");

  m.def(
      "trimmed_cross_entropy_backward_cuda",
      [](std::uintptr_t ptr, int64_t batch, int64_t classes, int64_t positions, int64_t sb, int64_t sc, int64_t sp,
         int dtype, std::uintptr_t target, std::uintptr_t row_max, std::uintptr_t log_sum, std::uintptr_t keep,
         std::uintptr_t scale, int64_t scale_stride, double factor, std::uintptr_t grad, int64_t gsb, int64_t gsc,
         int64_t gsp, std::uintptr_t stream) {
        LogitsView v = device_logits(ptr, batch, classes, positions, sb, sc, sp, dtype);
        LogitsView g = device_logits(grad, batch, classes, positions, gsb, gsc, gsp, dtype);
        PG_CHECK(scale_stride == 0 || scale_stride == 1, "scale_stride must be 0 or 1");
        pg::TrimRows rows{nullptr, reinterpret_cast<double*>(row_max), reinterpret_cast<double*>(log_sum),
                          reinterpret_cast<uint8_t*>(keep)};
        py::gil_scoped_release nogil;
        pg::trimmed_cross_entropy_backward_cuda(v, reinterpret_cast<const int64_t*>(target), rows,
                                                reinterpret_cast<const double*>(scale), scale_stride, factor, g,
                                                stream);
      },
      py::arg("ptr"), py::arg("batch"), py::arg("classes"), py::arg("positions"), py::arg("stride_b"),
      py::arg("stride_c"), py::arg("stride_p"), py::arg("dtype"), py::arg("target"), py::arg("row_max"),
      py::arg("log_sum"), py::arg("keep"), py::arg("scale"), py::arg("scale_stride"), py::arg("factor"),
      py::arg("grad"), py::arg("grad_stride_b"), py::arg("grad_stride_c"), py::arg("grad_stride_p"), py::arg("stream"),
      "Device version of trimmed_cross_entropy_backward: CUDA pointers, strides in elements.");
}
