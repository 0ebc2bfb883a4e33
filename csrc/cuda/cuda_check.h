// Error checks for CUDA runtime calls and kernel launches. A failure throws std::runtime_error, which pybind11
// turns into Python's RuntimeError, naming the CUDA error and the call that returned it.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace pg {
namespace detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err) + " (" + cudaGetErrorName(err) +
                           ") in `" + expr + "` at " + file + ":" + std::to_string(line));
}

}  // namespace detail
}  // namespace pg

/// PG_CUDA_CHECK(cudaMemsetAsync(...)) throws std::runtime_error when the call does not return cudaSuccess.
#define PG_CUDA_CHECK(expr)                                                                                   \
  do {                                                                                                        \
    const cudaError_t pg_cuda_err_ = (expr);                                                                  \
    if (pg_cuda_err_ != cudaSuccess) ::pg::detail::throw_cuda_error(pg_cuda_err_, #expr, __FILE__, __LINE__); \
  } while (0)

/// Call right after each kernel launch: launches report bad configurations only through cudaGetLastError.
#define PG_CUDA_CHECK_LAUNCH() PG_CUDA_CHECK(cudaGetLastError())
