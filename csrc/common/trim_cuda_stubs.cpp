// The trim CUDA entry points of a build without CUDA: each raises RuntimeError (see cuda_stubs.cpp).
#include <cstdint>
#include <stdexcept>

#include "trim.h"

namespace pg {

namespace {
constexpr const char* kNoCuda =
    "poisonguard was built without CUDA; reinstall with POISONGUARD_CUDA=ON and nvcc available";
}  // namespace

void trimmed_cross_entropy_forward_cuda(const LogitsView& /*logits*/, const int64_t* /*target*/,
                                        int64_t /*ignore_index*/, int64_t /*k*/, TrimRows /*rows*/, double* /*total*/,
                                        std::uintptr_t /*stream*/) {
  throw std::runtime_error(kNoCuda);
}

void trimmed_cross_entropy_backward_cuda(const LogitsView& /*logits*/, const int64_t* /*target*/,
                                         const TrimRows& /*rows*/, const double* /*scale*/, int64_t /*scale_stride*/,
                                         double /*factor*/, const LogitsView& /*grad*/, std::uintptr_t /*stream*/) {
  throw std::runtime_error(kNoCuda);
}

}  // namespace pg
