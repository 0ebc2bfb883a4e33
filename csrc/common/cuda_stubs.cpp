// The CUDA entry points of a build without CUDA: the module still imports and links, and every device entry point
// raises a RuntimeError that says how to get the CUDA kernels.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "covariance.h"
#include "device.h"
#include "projection.h"

namespace pg {

namespace {
constexpr const char* kNoCuda =
    "poisonguard was built without CUDA; reinstall with POISONGUARD_CUDA=ON and nvcc available";
}  // namespace

bool built_with_cuda() {
  return false;
}

int cuda_device_count() {
  return 0;
}

std::string cuda_runtime_version() {
  return "";
}

void covariance_update_cuda(const MatrixView& /*x*/, const int64_t* /*groups*/, CovState /*state*/,
                            std::uintptr_t /*stream*/) {
  throw std::runtime_error(kNoCuda);
}

void project_scores_cuda(const MatrixView& /*x*/, const int64_t* /*groups*/, int64_t /*n_groups*/,
                         const double* /*means*/, const void* /*dirs*/, int64_t /*k*/, void* /*proj*/,
                         double* /*score*/, const double* /*que*/, double* /*que_score*/, std::uintptr_t /*stream*/) {
  throw std::runtime_error(kNoCuda);
}

}  // namespace pg
