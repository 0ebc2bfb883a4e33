// What the CUDA build offers (declared in device.h); csrc/common/cuda_stubs.cpp defines the CPU-only versions.
#include <cuda_runtime.h>

#include <string>

#include "device.h"

namespace pg {

bool built_with_cuda() {
  return true;
}

int cuda_device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    // No driver or no device is an ordinary answer here (the module must import on CPU-only machines), so the
    // error is cleared rather than left for the next CUDA call to report.
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

std::string cuda_runtime_version() {
  // CUDART_VERSION is 1000 * major + 10 * minor (13000 -> "13.0").
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

}  // namespace pg
