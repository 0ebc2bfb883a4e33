// pybind11 wrappers of the cluster kernels; registered by PYBIND11_MODULE in bindings.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "bind_util.h"
#include "cluster.h"

namespace py = pybind11;

namespace {

using pg_bind::mutable_data;

template <typename T>
const T* const_data(const py::array& a, const char* name, py::ssize_t n) {
  PG_CHECK_TYPE(a.dtype().is(py::dtype::of<T>()), name, " must be ", std::string(py::str(py::dtype::of<T>())), ", got ",
                std::string(py::str(a.dtype())));
  PG_CHECK(a.ndim() == 1 && (n < 0 || a.shape(0) == n), name, " must be 1-D", n < 0 ? "" : " of length ",
           n < 0 ? std::string() : std::to_string(n));
  PG_CHECK(a.flags() & py::array::c_style, name, " must be C-contiguous");
  return static_cast<const T*>(a.data());
}

pg::UnionFind host_uf(py::array& parent, py::array& size) {
  PG_CHECK(parent.ndim() == 1, "parent must be 1-D");
  pg::UnionFind uf;
  uf.n = parent.shape(0);
  uf.parent = mutable_data<int64_t>(parent, "parent", {uf.n});
  uf.size = mutable_data<int64_t>(size, "size", {uf.n});
  return uf;
}

// lims may be FAISS's uint64 (size_t) offsets; they are read as int64 (same bits for any size that fits memory).
pg::NeighbourBlock host_block(const py::array& lims, const py::array& ids, const py::array& rows) {
  pg::NeighbourBlock b;
  PG_CHECK(rows.ndim() == 1, "rows must be 1-D");
  b.m = rows.shape(0);
  b.rows = const_data<int64_t>(rows, "rows", -1);
  PG_CHECK(lims.ndim() == 1 && lims.shape(0) == b.m + 1, "lims must be 1-D of length ", b.m + 1);
  PG_CHECK_TYPE(lims.dtype().is(py::dtype::of<int64_t>()) || lims.dtype().is(py::dtype::of<uint64_t>()),
                "lims must be int64 or uint64");
  PG_CHECK(lims.flags() & py::array::c_style, "lims must be C-contiguous");
  b.lims = static_cast<const int64_t*>(lims.data());
  PG_CHECK(b.lims[b.m] >= 0, "lims[-1] is negative");
  b.ids = const_data<int64_t>(ids, "ids", -1);
  PG_CHECK(ids.shape(0) >= b.lims[b.m], "ids has ", ids.shape(0), " entries but lims[-1] = ", b.lims[b.m]);
  return b;
}

}  // namespace

void pg_bind_cluster(py::module_& m) {
  m.def(
      "uf_union_block",
      [](py::array parent, py::array size, const py::array& lims, const py::array& ids, const py::array& rows,
         const py::array& core) {
        pg::UnionFind uf = host_uf(parent, size);
        pg::NeighbourBlock b = host_block(lims, ids, rows);
        const uint8_t* c = const_data<uint8_t>(core, "core", uf.n);
        py::gil_scoped_release nogil;
        return pg::uf_union_block_cpu(uf, b, c);
      },
      py::arg("parent"), py::arg("size"), py::arg("lims"), py::arg("ids"), py::arg("rows"), py::arg("core"),
      "Joins each core query rows[i] with its core neighbours ids[lims[i]:lims[i+1]] in the union-find (parent [n], "
      "size [n] int64, in place); core is uint8 [n]. Returns the number of merges.");

  m.def(
      "uf_union_edges",
      [](py::array parent, py::array size, const py::array& edges) {
        pg::UnionFind uf = host_uf(parent, size);
        PG_CHECK_TYPE(edges.dtype().is(py::dtype::of<int64_t>()), "edges must be int64");
        PG_CHECK(edges.ndim() == 2 && edges.shape(1) == 2, "edges must be [n_edges, 2]");
        PG_CHECK(edges.flags() & py::array::c_style, "edges must be C-contiguous");
        const int64_t* e = static_cast<const int64_t*>(edges.data());
        const int64_t ne = edges.shape(0);
        py::gil_scoped_release nogil;
        return pg::uf_union_edges_cpu(uf, e, ne);
      },
      py::arg("parent"), py::arg("size"), py::arg("edges"),
      "Joins the pairs of edges [n_edges, 2] int64 in the union-find, in place. Returns the number of merges.");

  m.def(
      "uf_components",
      [](py::array parent, py::array size, const py::object& mask) {
        pg::UnionFind uf = host_uf(parent, size);
        py::array keep;
        const uint8_t* mk = nullptr;
        if (!mask.is_none()) {
          keep = py::array::ensure(mask);
          PG_CHECK_TYPE(keep, "mask must be a uint8 array or None");
          mk = const_data<uint8_t>(keep, "mask", uf.n);
        }
        py::array_t<int64_t> labels(uf.n);
        int64_t* out = labels.mutable_data();
        int64_t count = 0;
        {
          py::gil_scoped_release nogil;
          count = pg::uf_components_cpu(uf, mk, out);
        }
        return py::make_tuple(labels, count);
      },
      py::arg("parent"), py::arg("size"), py::arg("mask") = py::none(),
      "(labels [n] int64, count): sets holding a masked element numbered by their smallest masked member, -1 for "
      "unmasked elements; compresses parent in place.");

  m.def(
      "border_labels",
      [](const py::array& lims, const py::array& ids, const py::array& rows, const py::array& core_label,
         py::array out) {
        pg::NeighbourBlock b = host_block(lims, ids, rows);
        PG_CHECK(core_label.ndim() == 1, "core_label must be 1-D");
        PG_CHECK(out.ndim() == 1, "out must be 1-D");
        const int64_t n_core = core_label.shape(0), n = out.shape(0);
        const int64_t* cl = const_data<int64_t>(core_label, "core_label", n_core);
        int64_t* o = mutable_data<int64_t>(out, "out", {n});
        py::gil_scoped_release nogil;
        pg::border_labels_cpu(b, n, n_core, cl, o);
      },
      py::arg("lims"), py::arg("ids"), py::arg("rows"), py::arg("core_label"), py::arg("out"),
      "For query rows[i] with out[rows[i]] < 0: out[rows[i]] = the smallest core_label of its neighbours "
      "ids[lims[i]:lims[i+1]] (indices into core_label [n_core]) that is >= 0 (else -1). In place on out [n] int64.");

  m.def(
      "dbscan_kdtree",
      [](const py::array& x, double eps2, int64_t min_samples, int64_t leaf_size) {
        PG_CHECK(x.ndim() == 2, "x must be 2-D [n, d], got ", x.ndim(), " dimension(s)");
        PG_CHECK_TYPE(x.dtype().is(py::dtype::of<float>()), "x must be float32, got ", std::string(py::str(x.dtype())));
        const int64_t n = x.shape(0), d = x.shape(1);
        PG_CHECK(d >= 1, "x must have at least one column");
        const int64_t ld = n > 1 ? pg_bind::element_stride(x, 0, "x") : d;
        PG_CHECK(n == 0 || d == 1 || pg_bind::element_stride(x, 1, "x") == 1, "x must have unit column stride");
        PG_CHECK(ld >= d, "x rows overlap (row stride ", ld, " < ", d, ")");
        py::array_t<int64_t> labels(n);
        py::array_t<bool> core(n);
        const float* px = static_cast<const float*>(x.data());
        int64_t* pl = labels.mutable_data();
        uint8_t* pc = reinterpret_cast<uint8_t*>(core.mutable_data());
        int64_t count = 0;
        py::array_t<double> seconds(pg::kDbscanStages);
        double* ps = seconds.mutable_data();
        {
          py::gil_scoped_release nogil;
          count = pg::dbscan_kdtree_cpu(px, n, d, ld, eps2, min_samples, leaf_size, pl, pc, ps);
        }
        return py::make_tuple(labels, core, count, seconds);
      },
      py::arg("x"), py::arg("eps2"), py::arg("min_samples"), py::arg("leaf_size") = 32,
      "Exact DBSCAN of float32 rows x [n, d] (unit column stride) on a kd-tree: (labels [n] int64, core [n] bool, "
      "n_clusters, seconds [5]: tree, core rows, joins from recorded neighbours, join search, borders). Core: >= "
      "min_samples rows (itself included) at squared distance <= eps2; clusters numbered by "
      "their smallest core row; a border row takes the smallest cluster number among its core neighbours.");
}
