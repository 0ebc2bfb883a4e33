// CUDA kernels of the projection op.
namespace pg {}  // namespace pg
