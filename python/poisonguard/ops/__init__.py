"""Array-level operations: validation and dispatch to the C++/CUDA kernels, no detection policy."""

from .covariance import StreamingCovariance
from .svd import randomized_svd, svd_method, top_eigh

__all__ = ["StreamingCovariance", "randomized_svd", "svd_method", "top_eigh"]
