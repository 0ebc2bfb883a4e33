// CUDA kernels of the trim op.
namespace pg {}  // namespace pg
