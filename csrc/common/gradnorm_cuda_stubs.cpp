// The gradnorm CUDA entry points of a build without CUDA: each raises RuntimeError (see cuda_stubs.cpp).
#include <cstdint>
#include <stdexcept>

#include "gradnorm.h"

namespace pg {

void gradnorm_linear_cuda(const BatchView& /*a*/, const BatchView& /*g*/, GradNormMethod /*method*/,
                          double* /*weight_sq*/, double* /*bias_sq*/, std::uintptr_t /*stream*/) {
  throw std::runtime_error("poisonguard was built without CUDA; reinstall with POISONGUARD_CUDA=ON and nvcc available");
}

}  // namespace pg
