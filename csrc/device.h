// What the CUDA side of the build offers; defined by csrc/cuda/device_cuda.cu or csrc/common/cuda_stubs.cpp.
#pragma once

#include <string>

namespace pg {

/// True when the module was compiled with the CUDA kernels.
bool built_with_cuda();

/// Number of usable CUDA devices; 0 without CUDA support, without a driver or without a device. Never throws.
int cuda_device_count();

/// "major.minor" of the CUDA runtime the module was built against; "" without CUDA.
std::string cuda_runtime_version();

}  // namespace pg
