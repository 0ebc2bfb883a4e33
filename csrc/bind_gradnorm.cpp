// pybind11 wrappers of the gradnorm kernels; registered by PYBIND11_MODULE in bindings.cpp.
#include <pybind11/pybind11.h>

#include "bind_util.h"

namespace py = pybind11;

void pg_bind_gradnorm(py::module_& /*m*/) {}
