// pybind11 wrappers of the gradnorm kernels; registered by PYBIND11_MODULE in bindings.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bind_util.h"
#include "common/sqgemm.h"
#include "gradnorm.h"

namespace py = pybind11;

namespace {

pg::BatchView host_batch(const py::array& x, bool bf16, const char* name) {
  PG_CHECK(x.ndim() == 3, name, " must be 3-D [B, T, d], got ", x.ndim(), " dimension(s)");
  pg::BatchView v;
  v.dtype = pg_bind::host_dtype(x, bf16, name);
  v.data = x.data();
  v.batch = x.shape(0);
  v.rows = x.shape(1);
  v.cols = x.shape(2);
  v.batch_stride = pg_bind::element_stride(x, 0, name);
  v.row_stride = pg_bind::element_stride(x, 1, name);
  v.col_stride = pg_bind::element_stride(x, 2, name);
  return v;
}

pg::BatchView device_batch(std::uintptr_t ptr, const py::tuple& shape, const py::tuple& strides, int dtype) {
  PG_CHECK(shape.size() == 3 && strides.size() == 3, "device arrays must be described by 3 sizes and 3 strides");
  PG_CHECK_TYPE(dtype >= 0 && dtype <= 3, "unknown dtype code ", dtype);
  pg::BatchView v;
  v.data = reinterpret_cast<const void*>(ptr);
  v.batch = shape[0].cast<int64_t>();
  v.rows = shape[1].cast<int64_t>();
  v.cols = shape[2].cast<int64_t>();
  v.batch_stride = strides[0].cast<int64_t>();
  v.row_stride = strides[1].cast<int64_t>();
  v.col_stride = strides[2].cast<int64_t>();
  v.dtype = static_cast<pg::DType>(dtype);
  return v;
}

pg::GradNormMethod parse_method(const std::string& method, int64_t t, int64_t d_in, int64_t d_out) {
  if (method == "ghost") return pg::GradNormMethod::ghost;
  if (method == "direct") return pg::GradNormMethod::direct;
  PG_CHECK(method == "auto", "method must be 'auto', 'ghost' or 'direct', got '", method, "'");
  return pg::choose_gradnorm_method(t, d_in, d_out);
}

double* optional_out(const py::object& out, int64_t n) {
  if (out.is_none()) return nullptr;
  py::array arr = out.cast<py::array>();
  return pg_bind::mutable_data<double>(arr, "bias_sq", {n});
}

// The book-keeping kernels' weight-gradient output: C-contiguous [d_out, d_in] in the compute type of `dt`.
void* grad_weight_out(py::array& out, pg::DType dt, int64_t d_out, int64_t d_in) {
  if (dt == pg::DType::float64) return pg_bind::mutable_data<double>(out, "grad_weight", {d_out, d_in});
  return pg_bind::mutable_data<float>(out, "grad_weight", {d_out, d_in});
}

// A C-contiguous input array of n elements of type T.
template <typename T>
const T* contiguous_in(const py::array& a, const char* name, int64_t n) {
  PG_CHECK_TYPE(a.dtype().is(py::dtype::of<T>()), name, " has the wrong dtype ", std::string(py::str(a.dtype())));
  PG_CHECK(a.flags() & py::array::c_style, name, " must be C-contiguous");
  PG_CHECK(a.size() == n, name, " has ", a.size(), " elements, expected ", n);
  return static_cast<const T*>(a.data());
}

// An optional vector output [n] in the compute type of `dt` (float32, or float64 for float64); `keep` holds the array.
void* vector_out(const py::object& out, py::array& keep, pg::DType dt, int64_t n, const char* name) {
  if (out.is_none()) return nullptr;
  keep = out.cast<py::array>();
  if (dt == pg::DType::float64) return pg_bind::mutable_data<double>(keep, name, {n});
  return pg_bind::mutable_data<float>(keep, name, {n});
}

}  // namespace

void pg_bind_gradnorm(py::module_& m) {
  m.def(
      "gradnorm_method",
      [](int64_t t, int64_t d_in, int64_t d_out, bool bookkeeping) {
        PG_CHECK(t >= 0 && d_in >= 0 && d_out >= 0, "T, d_in and d_out must be >= 0");
        const pg::GradNormMethod m =
            bookkeeping ? pg::choose_gradnorm_method_bk(t, d_in, d_out) : pg::choose_gradnorm_method(t, d_in, d_out);
        return m == pg::GradNormMethod::ghost ? "ghost" : "direct";
      },
      py::arg("t"), py::arg("d_in"), py::arg("d_out"), py::arg("bookkeeping") = false,
      "The form the cost model picks for a linear map with T positions, d_in inputs and d_out outputs (bookkeeping: "
      "when the direct form also yields the weight gradient).");

  m.def(
      "gradnorm_linear",
      [](const py::array& a, const py::array& g, const std::string& method, py::array weight_sq,
         const py::object& bias_sq, bool bf16) {
        pg::BatchView av = host_batch(a, bf16, "a");
        pg::BatchView gv = host_batch(g, bf16, "g");
        PG_CHECK(av.batch == gv.batch && av.rows == gv.rows, "a [B, T, d_in] and g [B, T, d_out] must agree in B and ",
                 "T, got a [", av.batch, ", ", av.rows, ", ", av.cols, "] and g [", gv.batch, ", ", gv.rows, ", ",
                 gv.cols, "]");
        const pg::GradNormMethod meth = parse_method(method, av.rows, av.cols, gv.cols);
        double* w = pg_bind::mutable_data<double>(weight_sq, "weight_sq", {av.batch});
        double* bsq = nullptr;
        py::array bias_arr;
        if (!bias_sq.is_none()) {
          bias_arr = bias_sq.cast<py::array>();
          bsq = pg_bind::mutable_data<double>(bias_arr, "bias_sq", {av.batch});
        }
        {
          py::gil_scoped_release nogil;
          pg::gradnorm_linear_cpu(av, gv, meth, w, bsq);
        }
        return meth == pg::GradNormMethod::ghost ? "ghost" : "direct";
      },
      py::arg("a"), py::arg("g"), py::arg("method"), py::arg("weight_sq"), py::arg("bias_sq") = py::none(),
      py::arg("bf16") = false,
      "Per-sample ‖G_bᵀ A_b‖_F² of a [B, T, d_in] and g [B, T, d_out] (host, strided, one dtype) into weight_sq [B] "
      "float64, and ‖Σ_t g_t‖² into bias_sq [B] unless None; returns the form used ('ghost' or 'direct').");

  m.def(
      "gradnorm_linear_bk",
      [](const py::array& a, const py::array& g, py::array grad_weight, py::array weight_sq, const py::object& bias_sq,
         bool bf16, const py::object& grad_bias) {
        pg::BatchView av = host_batch(a, bf16, "a");
        pg::BatchView gv = host_batch(g, bf16, "g");
        double* w = pg_bind::mutable_data<double>(weight_sq, "weight_sq", {av.batch});
        double* bsq = optional_out(bias_sq, av.batch);
        void* gw = grad_weight_out(grad_weight, av.dtype, gv.cols, av.cols);
        py::array gb_arr;
        void* gb = vector_out(grad_bias, gb_arr, av.dtype, gv.cols, "grad_bias");
        py::gil_scoped_release nogil;
        pg::gradnorm_linear_bk_cpu(av, gv, w, bsq, gw, gb);
      },
      py::arg("a"), py::arg("g"), py::arg("grad_weight"), py::arg("weight_sq"), py::arg("bias_sq") = py::none(),
      py::arg("bf16") = false, py::arg("grad_bias") = py::none(),
      "Book-keeping form: per-sample ‖G_bᵀ A_b‖_F² into weight_sq [B] (and ‖Σ_t g_t‖² into bias_sq unless None) and "
      "Σ_b G_bᵀ A_b into grad_weight [d_out, d_in] (C-contiguous, float32 or float64 for float64 input); the bias "
      "gradient Σ_b Σ_t g_t into grad_bias [d_out] (same dtype) unless None.");

  m.def(
      "gradnorm_conv_bk",
      [](const py::array& x, const py::array& g, const py::tuple& geometry, py::array grad_weight, py::array weight_sq,
         const py::object& bias_sq, bool bf16, const py::object& grad_bias) {
        PG_CHECK(x.ndim() == 4, "x must be 4-D [B, C, H, W], got ", x.ndim(), " dimension(s)");
        PG_CHECK(geometry.size() == 11,
                 "geometry is (kh, kw, sh, sw, dh, dw, pad_h, pad_w, out_h, out_w, groups), got ", geometry.size(),
                 " values");
        pg::ConvInputView xv;
        xv.dtype = pg_bind::host_dtype(x, bf16, "x");
        xv.data = x.data();
        xv.batch = x.shape(0);
        xv.channels = x.shape(1);
        xv.height = x.shape(2);
        xv.width = x.shape(3);
        xv.batch_stride = pg_bind::element_stride(x, 0, "x");
        xv.channel_stride = pg_bind::element_stride(x, 1, "x");
        xv.row_stride = pg_bind::element_stride(x, 2, "x");
        xv.col_stride = pg_bind::element_stride(x, 3, "x");
        int64_t* fields[] = {&xv.kernel_h, &xv.kernel_w, &xv.stride_h, &xv.stride_w, &xv.dilation_h, &xv.dilation_w,
                             &xv.pad_h,    &xv.pad_w,    &xv.out_h,    &xv.out_w,    &xv.groups};
        for (size_t i = 0; i < 11; ++i) *fields[i] = geometry[i].cast<int64_t>();
        pg::BatchView gv = host_batch(g, bf16, "g");
        PG_CHECK(xv.groups >= 1 && xv.channels % xv.groups == 0, "C_in = ", xv.channels,
                 " is not divisible by groups = ", xv.groups);
        double* w = pg_bind::mutable_data<double>(weight_sq, "weight_sq", {xv.batch});
        double* bsq = optional_out(bias_sq, xv.batch);
        void* gw = grad_weight_out(grad_weight, xv.dtype, gv.cols, xv.channels / xv.groups * xv.kernel_h * xv.kernel_w);
        py::array gb_arr;
        void* gb = vector_out(grad_bias, gb_arr, xv.dtype, gv.cols, "grad_bias");
        py::gil_scoped_release nogil;
        pg::gradnorm_conv_bk_cpu(xv, gv, w, bsq, gw, gb);
      },
      py::arg("x"), py::arg("g"), py::arg("geometry"), py::arg("grad_weight"), py::arg("weight_sq"),
      py::arg("bias_sq") = py::none(), py::arg("bf16") = false, py::arg("grad_bias") = py::none(),
      "Book-keeping form of a convolution: x [B, C, H, W] (host, strided), g [B, L, C_out], geometry (kh, kw, sh, sw, "
      "dh, dw, pad_h, pad_w, out_h, out_w, groups); per-sample squared norms into weight_sq (and bias_sq unless None) "
      "and the weight gradient into grad_weight [C_out, C/groups·kh·kw] (the bias gradient into grad_bias [C_out] "
      "unless "
      "None).");

  m.def(
      "gradnorm_layernorm",
      [](const py::array& x, const py::array& g, const py::array& mean, const py::array& rstd,
         const py::object& weight_sq, const py::object& bias_sq, const py::object& grad_weight,
         const py::object& grad_bias, bool bf16) {
        pg::BatchView xv = host_batch(x, bf16, "x");
        pg::BatchView gv = host_batch(g, bf16, "g");
        PG_CHECK(xv.batch == gv.batch && xv.rows == gv.rows && xv.cols == gv.cols, "x and g must have the same shape");
        const int64_t rows = xv.batch * xv.rows;
        const bool wide = xv.dtype == pg::DType::float64;
        const void *mp = nullptr, *rp = nullptr;
        if (wide) {
          mp = contiguous_in<double>(mean, "mean", rows);
          rp = contiguous_in<double>(rstd, "rstd", rows);
        } else {
          mp = contiguous_in<float>(mean, "mean", rows);
          rp = contiguous_in<float>(rstd, "rstd", rows);
        }
        double* w = optional_out(weight_sq, xv.batch);
        double* bsq = optional_out(bias_sq, xv.batch);
        py::array gw_arr, gb_arr;
        void* gw = vector_out(grad_weight, gw_arr, xv.dtype, xv.cols, "grad_weight");
        void* gb = vector_out(grad_bias, gb_arr, xv.dtype, xv.cols, "grad_bias");
        py::gil_scoped_release nogil;
        pg::gradnorm_layernorm_cpu(xv, gv, mp, rp, w, bsq, gw, gb);
      },
      py::arg("x"), py::arg("g"), py::arg("mean"), py::arg("rstd"), py::arg("weight_sq"), py::arg("bias_sq"),
      py::arg("grad_weight"), py::arg("grad_bias"), py::arg("bf16") = false,
      "LayerNorm affine gradients: x and g [B, T, N] (host, strided), mean and rstd (B·T values, contiguous, float32 "
      "or float64 for float64 input); per-sample ‖Σ_t g⊙x̂‖² and ‖Σ_t g‖² into weight_sq / bias_sq [B] float64, their "
      "batch sums into grad_weight / grad_bias [N]; any output may be None.");

  m.def(
      "sqgemm_isa", [] { return std::string(pg::sqgemm_isa_name(pg::sqgemm_isa())); },
      "The instruction set of the book-keeping form's float32 kernel in use (per-sample blocks squared in registers): "
      "'avx512', 'avx2' or 'none' (BLAS per sample).");
  m.def(
      "sqgemm_best_isa", [] { return std::string(pg::sqgemm_isa_name(pg::sqgemm_best_isa())); },
      "The best instruction set this CPU runs the book-keeping kernel with: 'avx512' (AVX-512 F and DQ), 'avx2' "
      "(AVX2 and FMA) or 'none'. sqgemm_isa() starts at 'avx512' where the CPU has it, else 'none' (the AVX2 kernel is "
      "opt-in: it has not been measured on a CPU without AVX-512).");
  m.def(
      "sqgemm_set_isa",
      [](const std::string& name) {
        pg::SqgemmIsa isa = pg::SqgemmIsa::none;
        if (name == "avx512") {
          isa = pg::SqgemmIsa::avx512;
        } else if (name == "avx2") {
          isa = pg::SqgemmIsa::avx2;
        } else if (name != "none") {
          throw py::value_error("sqgemm_set_isa: unknown ISA '" + name + "' (allowed: 'avx512', 'avx2', 'none')");
        }
        return std::string(pg::sqgemm_isa_name(pg::sqgemm_set_isa(isa)));  // std::invalid_argument → ValueError
      },
      py::arg("name"),
      "Switch the book-keeping kernel's instruction set ('avx512', 'avx2', or 'none' for BLAS per sample; for tests "
      "and timings); returns the previous one. ValueError for an unknown name or one this CPU lacks.");

  m.def(
      "gradnorm_embedding",
      [](const py::array& idx, const py::array& g, int64_t padding_idx, py::array out, bool bf16) {
        pg::BatchView gv = host_batch(g, bf16, "g");
        const int64_t* ip = contiguous_in<int64_t>(idx, "idx", gv.batch * gv.rows);
        double* o = pg_bind::mutable_data<double>(out, "out", {gv.batch});
        py::gil_scoped_release nogil;
        pg::gradnorm_embedding_cpu(ip, gv, padding_idx, o);
      },
      py::arg("idx"), py::arg("g"), py::arg("padding_idx"), py::arg("out"), py::arg("bf16") = false,
      "Per-sample squared norm of an Embedding's weight gradient: idx [B, T] int64 (contiguous), g [B, T, N] (host, "
      "strided); rows of one id summed before squaring, padding_idx (-1: none) skipped; into out [B] float64.");

  m.def(
      "gradnorm_linear_cuda",
      [](std::uintptr_t a_ptr, const py::tuple& a_shape, const py::tuple& a_strides, std::uintptr_t g_ptr,
         const py::tuple& g_shape, const py::tuple& g_strides, int dtype, const std::string& method,
         std::uintptr_t weight_sq, std::uintptr_t bias_sq, std::uintptr_t stream) {
        pg::BatchView av = device_batch(a_ptr, a_shape, a_strides, dtype);
        pg::BatchView gv = device_batch(g_ptr, g_shape, g_strides, dtype);
        PG_CHECK(av.batch == gv.batch && av.rows == gv.rows, "a and g must agree in B and T");
        const pg::GradNormMethod meth = parse_method(method, av.rows, av.cols, gv.cols);
        {
          py::gil_scoped_release nogil;
          pg::gradnorm_linear_cuda(av, gv, meth, reinterpret_cast<double*>(weight_sq),
                                   reinterpret_cast<double*>(bias_sq), stream);
        }
        return meth == pg::GradNormMethod::ghost ? "ghost" : "direct";
      },
      py::arg("a_ptr"), py::arg("a_shape"), py::arg("a_strides"), py::arg("g_ptr"), py::arg("g_shape"),
      py::arg("g_strides"), py::arg("dtype"), py::arg("method"), py::arg("weight_sq"), py::arg("bias_sq"),
      py::arg("stream"),
      "Device twin of gradnorm_linear: pointers, shapes and strides (elements) of CUDA arrays; float64 outputs "
      "[B] (bias_sq 0 = none); enqueued on `stream`.");
}
