// CPU kernels of the cluster op.
namespace pg {}  // namespace pg
