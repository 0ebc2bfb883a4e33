// The only pybind11 module (PYBIND11_MODULE): thin wrappers that read pointers, shapes and strides, release the GIL
// and call the ops. Ops with their own wrapper file (csrc/bind_<op>.cpp) are registered at the end.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>

#include "bind_util.h"
#include "common/blas.h"

#include "common/check.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "common/sqgemm.h"
#include "covariance.h"
#include "device.h"
#include "projection.h"
#include "svd.h"

namespace py = pybind11;

// Each op with its own wrapper file registers its functions here (csrc/bind_<op>.cpp).
void pg_bind_trim(py::module_& m);
void pg_bind_gradnorm(py::module_& m);
void pg_bind_cluster(py::module_& m);

namespace {

using pg::DType;
using pg::MatrixView;
using namespace pg_bind;

pg::CovState host_state(py::array& count, py::array& mean, py::array& m2) {
  PG_CHECK(mean.ndim() == 2, "mean must be [G, d]");
  pg::CovState st;
  st.n_groups = mean.shape(0);
  st.dim = mean.shape(1);
  st.count = mutable_data<int64_t>(count, "count", {st.n_groups});
  st.mean = mutable_data<double>(mean, "mean", {st.n_groups, st.dim});
  st.m2 = mutable_data<double>(m2, "m2", {st.n_groups, st.dim, st.dim});
  return st;
}

// The optional fp32 staging (None, or a tuple (rows [G, R, d], rows_n [G], c [G, d, d], shift [G, d], sum [G, d],
// n [G])).
pg::CovPending host_pending(const pg::CovState& st, const py::object& staging) {
  pg::CovPending p;
  if (staging.is_none()) return p;
  py::tuple t = staging;
  PG_CHECK(t.size() == 6, "staging must be a tuple of 6 arrays");
  py::array rows = t[0], rows_n = t[1], c = t[2], shift = t[3], sum = t[4], n = t[5];
  PG_CHECK(rows.ndim() == 3, "staging rows must be [G, R, d]");
  p.rows_cap = rows.shape(1);
  PG_CHECK(p.rows_cap >= 1, "staging rows must hold at least one row per group");
  p.rows = mutable_data<float>(rows, "staging rows", {st.n_groups, p.rows_cap, st.dim});
  p.rows_n = mutable_data<int64_t>(rows_n, "staging rows_n", {st.n_groups});
  p.c = mutable_data<float>(c, "staging c", {st.n_groups, st.dim, st.dim});
  p.shift = mutable_data<float>(shift, "staging shift", {st.n_groups, st.dim});
  p.sum = mutable_data<double>(sum, "staging sum", {st.n_groups, st.dim});
  p.n = mutable_data<int64_t>(n, "staging n", {st.n_groups});
  return p;
}

void check_compute_q(const py::array& q, DType dt, int64_t n, const char* name) {
  const bool f64 = dt == DType::float64;
  PG_CHECK_TYPE(q.dtype().is(f64 ? py::dtype::of<double>() : py::dtype::of<float>()), name, " must be ",
                f64 ? "float64" : "float32", " for this input");
  PG_CHECK(q.ndim() == 2 && q.shape(0) == n, name, " must be [", n, ", l]");
  PG_CHECK(q.flags() & py::array::c_style, name, " must be C-contiguous");
}

std::string compiler_info() {
#if defined(__clang__)
  return pg::str_cat("clang ", __clang_major__, ".", __clang_minor__, ".", __clang_patchlevel__);
#elif defined(__GNUC__)
  return pg::str_cat("gcc ", __GNUC__, ".", __GNUC_MINOR__, ".", __GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "poisonguard compiled kernels (C++ / CUDA). Use the Python API in poisonguard.ops.";
  py::register_exception<pg::type_error>(m, "KernelTypeError", PyExc_TypeError);

  m.attr("__version__") = PG_VERSION;

  m.def(
      "covariance_update",
      [](const py::array& x, const py::object& groups, py::array count, py::array mean, py::array m2, bool bf16,
         const py::object& staging) {
        MatrixView v = host_matrix(x, bf16, "x");
        pg::CovState st = host_state(count, mean, m2);
        pg::CovPending pend = host_pending(st, staging);
        py::array keep;
        const int64_t* g = host_groups(groups, v.rows, keep);
        py::gil_scoped_release nogil;
        pg::covariance_update_cpu(v, g, st, pend);
      },
      py::arg("x"), py::arg("groups"), py::arg("count"), py::arg("mean"), py::arg("m2"), py::arg("bf16") = false,
      py::arg("staging") = py::none(),
      "Adds x [n, d] (rows grouped by int64 groups [n] or None) into the host state (count [G], mean [G, d], "
      "m2 [G, d, d] upper triangle), in place, through the optional fp32 staging arrays.");

  m.def(
      "covariance_flush",
      [](py::array count, py::array mean, py::array m2, const py::object& staging) {
        pg::CovState st = host_state(count, mean, m2);
        pg::CovPending pend = host_pending(st, staging);
        py::gil_scoped_release nogil;
        pg::covariance_flush_cpu(st, pend);
      },
      "Merges the staged rows into the state and empties the staging.");

  m.def(
      "covariance_merge",
      [](py::array ca, py::array ma, py::array sa, py::array cb, py::array mb, py::array sb) {
        pg::CovState a = host_state(ca, ma, sa);
        pg::CovState b = host_state(cb, mb, sb);
        py::gil_scoped_release nogil;
        pg::covariance_merge_cpu(a, b);
      },
      "Merges state b into state a (Chan's formula), in place on a.");

  m.def(
      "covariance_update_cuda",
      [](std::uintptr_t x_ptr, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride, int dtype,
         std::uintptr_t groups_ptr, int64_t n_groups, std::uintptr_t count_ptr, std::uintptr_t mean_ptr,
         std::uintptr_t m2_ptr, std::uintptr_t stream) {
        const MatrixView v = device_view(x_ptr, rows, cols, row_stride, col_stride, dtype);
        pg::CovState st;
        st.n_groups = n_groups;
        st.dim = cols;
        st.count = reinterpret_cast<int64_t*>(count_ptr);
        st.mean = reinterpret_cast<double*>(mean_ptr);
        st.m2 = reinterpret_cast<double*>(m2_ptr);
        py::gil_scoped_release nogil;
        pg::covariance_update_cuda(v, reinterpret_cast<const int64_t*>(groups_ptr), st, stream);
      },
      py::arg("x_ptr"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("col_stride"),
      py::arg("dtype"), py::arg("groups_ptr"), py::arg("n_groups"), py::arg("count_ptr"), py::arg("mean_ptr"),
      py::arg("m2_ptr"), py::arg("stream"),
      "Device version of covariance_update: all pointers are CUDA device pointers, strides in elements.");

  m.def(
      "project_scores",
      [](const py::array& x, const py::object& groups, const py::array& means, const py::array& dirs, bool want_proj,
         const py::object& que, bool bf16) {
        MatrixView v = host_matrix(x, bf16, "x");
        PG_CHECK(means.ndim() == 2 && means.shape(1) == v.cols, "means must be [G, ", v.cols, "]");
        const int64_t G = means.shape(0);
        PG_CHECK(dirs.ndim() == 3 && dirs.shape(0) == G && dirs.shape(1) == v.cols, "directions must be [", G, ", ",
                 v.cols, ", k]");
        const int64_t k = dirs.shape(2);
        const bool f64 = v.dtype == DType::float64;
        PG_CHECK_TYPE(means.dtype().is(py::dtype::of<double>()) && (means.flags() & py::array::c_style),
                      "means must be C-contiguous float64");
        PG_CHECK_TYPE(dirs.dtype().is(f64 ? py::dtype::of<double>() : py::dtype::of<float>()) &&
                          (dirs.flags() & py::array::c_style),
                      "directions must be C-contiguous ", f64 ? "float64" : "float32", " for this input");
        py::array keep;
        const int64_t* g = host_groups(groups, v.rows, keep);
        py::array que_arr;
        const double* qp = nullptr;
        if (!que.is_none()) {
          que_arr = py::array::ensure(que);
          PG_CHECK_TYPE(
              que_arr && que_arr.dtype().is(py::dtype::of<double>()) && (que_arr.flags() & py::array::c_style),
              "que must be a C-contiguous float64 array");
          PG_CHECK(que_arr.ndim() == 3 && que_arr.shape(0) == G && que_arr.shape(1) == k && que_arr.shape(2) == k,
                   "que must be [", G, ", ", k, ", ", k, "]");
          qp = static_cast<const double*>(que_arr.data());
        }
        py::array proj = want_proj ? compute_array(v.dtype, {v.rows, k}) : py::array();
        py::array_t<double> score(v.rows);
        py::array_t<double> qs(qp ? v.rows : 0);
        void* pp = want_proj ? proj.mutable_data() : nullptr;
        double* sp = score.mutable_data();
        double* qsp = qp ? qs.mutable_data() : nullptr;
        const double* mp = static_cast<const double*>(means.data());
        const void* dp = dirs.data();
        {
          py::gil_scoped_release nogil;
          pg::project_scores_cpu(v, g, G, mp, dp, k, pp, sp, qp, qsp);
        }
        return py::make_tuple(want_proj ? py::object(proj) : py::object(py::none()), score,
                              qp ? py::object(qs) : py::object(py::none()));
      },
      py::arg("x"), py::arg("groups"), py::arg("means"), py::arg("directions"), py::arg("want_proj") = true,
      py::arg("que") = py::none(), py::arg("bf16") = false,
      "(proj [n, k] or None, score [n] = |proj|^2, que [n] or None) for proj = (x - means[g]) @ directions[g].");

  m.def(
      "project_scores_cuda",
      [](std::uintptr_t x_ptr, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride, int dtype,
         std::uintptr_t groups_ptr, int64_t n_groups, std::uintptr_t means_ptr, std::uintptr_t dirs_ptr, int64_t k,
         std::uintptr_t proj_ptr, std::uintptr_t score_ptr, std::uintptr_t que_ptr, std::uintptr_t que_score_ptr,
         std::uintptr_t stream) {
        const MatrixView v = device_view(x_ptr, rows, cols, row_stride, col_stride, dtype);
        py::gil_scoped_release nogil;
        pg::project_scores_cuda(v, reinterpret_cast<const int64_t*>(groups_ptr), n_groups,
                                reinterpret_cast<const double*>(means_ptr), reinterpret_cast<const void*>(dirs_ptr), k,
                                reinterpret_cast<void*>(proj_ptr), reinterpret_cast<double*>(score_ptr),
                                reinterpret_cast<const double*>(que_ptr), reinterpret_cast<double*>(que_score_ptr),
                                stream);
      },
      py::arg("x_ptr"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("col_stride"),
      py::arg("dtype"), py::arg("groups_ptr"), py::arg("n_groups"), py::arg("means_ptr"), py::arg("dirs_ptr"),
      py::arg("k"), py::arg("proj_ptr"), py::arg("score_ptr"), py::arg("que_ptr"), py::arg("que_score_ptr"),
      py::arg("stream"), "Device version of project_scores: CUDA device pointers (0 for none), strides in elements.");

  m.def(
      "segmented_power_pass",
      [](const py::array& x, const py::object& groups, const py::array& shift, const py::array& q, py::array z,
         py::array sums, py::array counts, bool bf16) {
        MatrixView v = host_matrix(x, bf16, "x");
        PG_CHECK(shift.ndim() == 2 && shift.shape(1) == v.cols, "shift must be [G, ", v.cols, "]");
        const int64_t G = shift.shape(0);
        PG_CHECK_TYPE(shift.dtype().is(py::dtype::of<double>()) && (shift.flags() & py::array::c_style),
                      "shift must be C-contiguous float64");
        PG_CHECK(q.ndim() == 3 && q.shape(0) == G && q.shape(1) == v.cols && q.shape(2) >= 1, "q must be [", G, ", ",
                 v.cols, ", l]");
        const int64_t l = q.shape(2);
        const bool f64 = v.dtype == DType::float64;
        PG_CHECK_TYPE(
            q.dtype().is(f64 ? py::dtype::of<double>() : py::dtype::of<float>()) && (q.flags() & py::array::c_style),
            "q must be C-contiguous ", f64 ? "float64" : "float32", " for this input");
        double* zp = mutable_data<double>(z, "z", {G, v.cols, l});
        double* sp = mutable_data<double>(sums, "sums", {G, v.cols});
        int64_t* cp = mutable_data<int64_t>(counts, "counts", {G});
        py::array keep;
        const int64_t* g = host_groups(groups, v.rows, keep);
        const double* shp = static_cast<const double*>(shift.data());
        const void* qp = q.data();
        py::gil_scoped_release nogil;
        pg::segmented_power_pass_cpu(v, g, G, shp, qp, l, zp, sp, cp);
      },
      py::arg("x"), py::arg("groups"), py::arg("shift"), py::arg("q"), py::arg("z"), py::arg("sums"), py::arg("counts"),
      py::arg("bf16") = false,
      "Accumulates, per class g, z[g] += U^T (U q[g]), sums[g] += sum of U, counts[g] += rows, for U = the rows of "
      "class g minus shift[g].");

  m.def(
      "gram",
      [](const py::array& a, bool bf16) {
        MatrixView v = host_matrix(a, bf16, "a");
        py::array_t<double> out({v.cols, v.cols});
        double* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          pg::gram_cpu(v, o);
        }
        return out;
      },
      py::arg("a"), py::arg("bf16") = false, "A^T A [n, n] float64 for a [m, n].");

  m.def(
      "power_pass",
      [](const py::array& a, const py::array& q, bool bf16) {
        MatrixView v = host_matrix(a, bf16, "a");
        check_compute_q(q, v.dtype, v.cols, "q");
        const int64_t l = q.shape(1);
        py::array_t<double> z({v.cols, l});
        double* zp = z.mutable_data();
        {
          py::gil_scoped_release nogil;
          pg::power_pass_cpu(v, q.data(), l, zp);
        }
        return z;
      },
      py::arg("a"), py::arg("q"), py::arg("bf16") = false, "z [n, l] float64 = a^T (a q), one pass over a.");

  m.def(
      "project",
      [](const py::array& a, const py::array& q, bool bf16) {
        MatrixView v = host_matrix(a, bf16, "a");
        check_compute_q(q, v.dtype, v.cols, "q");
        const int64_t l = q.shape(1);
        py::array y = compute_array(v.dtype, {v.rows, l});
        py::array_t<double> yty({l, l});
        void* yp = y.mutable_data();
        double* gp = yty.mutable_data();
        {
          py::gil_scoped_release nogil;
          pg::project_cpu(v, q.data(), l, yp, gp);
        }
        return py::make_tuple(y, yty);
      },
      py::arg("a"), py::arg("q"), py::arg("bf16") = false,
      "(y [m, l], y^T y [l, l] float64) with y = a q in the compute type.");

  m.def(
      "matmul",
      [](const py::array& a, const py::array& b) {
        // Small products of the drivers through this module's BLAS, so numpy's thread pool (which spins after each
        // call) is not woken in the middle of a pass.
        PG_CHECK(a.ndim() == 2 && b.ndim() == 2 && a.shape(1) == b.shape(0), "matmul needs [m, k] @ [k, n]");
        PG_CHECK_TYPE(
            a.dtype().is(b.dtype()) && (a.dtype().is(py::dtype::of<float>()) || a.dtype().is(py::dtype::of<double>())),
            "matmul operands must both be float32 or both float64");
        PG_CHECK((a.flags() & py::array::c_style) && (b.flags() & py::array::c_style),
                 "matmul operands must be C-contiguous");
        const int m = pg::blas_int(a.shape(0), "m"), k = pg::blas_int(a.shape(1), "k"),
                  n = pg::blas_int(b.shape(1), "n");
        const bool f64 = a.dtype().is(py::dtype::of<double>());
        py::array out = f64 ? py::array(py::array_t<double>({a.shape(0), b.shape(1)}))
                            : py::array(py::array_t<float>({a.shape(0), b.shape(1)}));
        const void* ap = a.data();
        const void* bp = b.data();
        void* op = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          if (m == 0 || n == 0) {
          } else if (k == 0) {
            std::memset(op, 0, static_cast<size_t>(m) * n * (f64 ? 8 : 4));
          } else if (f64) {
            pg::matmul_cpu_f64(m, n, k, static_cast<const double*>(ap), static_cast<const double*>(bp),
                               static_cast<double*>(op));
          } else {
            pg::matmul_cpu_f32(m, n, k, static_cast<const float*>(ap), static_cast<const float*>(bp),
                               static_cast<float*>(op));
          }
        }
        return out;
      },
      py::arg("a"), py::arg("b"), "a @ b for C-contiguous float32 or float64 matrices (this module's BLAS).");

  m.def(
      "orthonormalize",
      [](py::array q) {
        PG_CHECK(q.ndim() == 2, "q must be 2-D");
        const int64_t n = q.shape(0), l = q.shape(1);
        double* p = mutable_data<double>(q, "q", {n, l});
        py::gil_scoped_release nogil;
        pg::orthonormalize_cpu(p, n, l);
      },
      py::arg("q"), "In place: columns of float64 q [n, l] (n >= l) -> orthonormal basis (Householder QR).");

  m.def(
      "eigh_top",
      [](const py::array& c, int64_t k) {
        PG_CHECK(c.ndim() == 2 && c.shape(0) == c.shape(1), "c must be square [d, d]");
        PG_CHECK_TYPE(c.dtype().is(py::dtype::of<double>()), "c must be float64");
        PG_CHECK(c.flags() & py::array::c_style, "c must be C-contiguous");
        const int64_t d = c.shape(0);
        PG_CHECK(k >= 0 && k <= d, "k must be in [0, ", d, "], got ", k);
        py::array_t<double> w(k), v({d, k});
        const double* cp = static_cast<const double*>(c.data());
        double* wp = w.mutable_data();
        double* vp = v.mutable_data();
        {
          py::gil_scoped_release nogil;
          pg::eigh_top_cpu(cp, d, k, wp, vp);
        }
        return py::make_tuple(w, v);
      },
      py::arg("c"), py::arg("k"), "k largest eigenpairs of symmetric float64 c: (w [k] descending, v [d, k]).");

  m.def(
      "gaussian",
      [](uint64_t seed, int64_t rows, int64_t cols) {
        PG_CHECK(rows >= 0 && cols >= 0, "shape must be non-negative");
        py::array_t<double> out({rows, cols});
        pg::gaussian_cpu(seed, rows * cols, out.mutable_data());
        return out;
      },
      py::arg("seed"), py::arg("rows"), py::arg("cols"), "Deterministic standard normal [rows, cols] float64.");

  m.def("get_num_threads", &pg::get_num_threads);
  m.def("set_num_threads", &pg::set_num_threads, py::arg("n"));
  m.def("set_openmp_runtime", &pg::set_openmp_runtime, py::arg("gomp_parallel"), py::arg("omp_get_thread_num"),
        py::arg("omp_get_num_threads"),
        "Run poisonguard's parallel loops on the threads of an OpenMP runtime (libgomp) already loaded in the process, "
        "given the addresses of its GOMP_parallel, omp_get_thread_num and omp_get_num_threads (all 0: threads of our "
        "own again); returns whether one was set before.");
  m.def("openmp_runtime_set", &pg::openmp_runtime_set);
  m.def("blas_get_num_threads", &pg::blas_get_num_threads);
  m.def("blas_set_num_threads", &pg::blas_set_num_threads, py::arg("n"));
  m.def("built_with_cuda", &pg::built_with_cuda);
  m.def("cuda_device_count", &pg::cuda_device_count);
  m.def("build_info", []() {
    py::dict d;
    d["version"] = PG_VERSION;
    d["cuda"] = pg::built_with_cuda();
    d["cuda_version"] = pg::built_with_cuda() ? py::object(py::str(pg::cuda_runtime_version())) : py::none();
    d["blas"] = pg::str_cat("OpenBLAS ", PG_OPENBLAS_VERSION, " (", pg::blas_config(), ")");
    d["blas_threads"] = pg::blas_get_num_threads();
    d["threads"] = pg::get_num_threads();
    d["compiler"] = compiler_info();
    // the instruction set the C++ kernels were compiled for (POISONGUARD_CPU_ARCH); wider kernels chosen at run time
    // (the book-keeping form's AVX-512 / AVX2 tiles) are reported by _core.sqgemm_isa()
#if defined(__AVX2__) && defined(__FMA__)
    d["cpu_isa"] = "avx2";
#elif defined(__x86_64__)
    d["cpu_isa"] = "x86-64";
#else
    d["cpu_isa"] = "other";
#endif
    d["sqgemm_isa"] = pg::sqgemm_isa_name(pg::sqgemm_isa());
    return d;
  });

  pg_bind_trim(m);
  pg_bind_gradnorm(m);
  pg_bind_cluster(m);
}
