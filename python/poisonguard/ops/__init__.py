"""Array-level operations: validation and dispatch to the C++/CUDA kernels, no detection policy."""

from .covariance import StreamingCovariance
from .gradnorm import gradnorm_method, linear_grad_sqnorms
from .projection import project_scores
from .svd import randomized_svd, svd_method, top_eigh

__all__ = [
    "StreamingCovariance",
    "gradnorm_method",
    "linear_grad_sqnorms",
    "project_scores",
    "randomized_svd",
    "svd_method",
    "top_eigh",
]
