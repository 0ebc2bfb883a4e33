// The gradnorm CUDA entry points of a build without CUDA: each raises RuntimeError (see cuda_stubs.cpp).
namespace pg {}  // namespace pg
