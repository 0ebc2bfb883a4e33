// CUDA kernels of the gradnorm op.
namespace pg {}  // namespace pg
