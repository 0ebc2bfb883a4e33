"""Array-level operations: validation and dispatch to the C++/CUDA kernels, no detection policy."""

from .covariance import StreamingCovariance
from .gradnorm import (
    conv_grad_bookkeeping,
    embedding_grad_sqnorms,
    gradnorm_method,
    layer_norm_grad_sqnorms,
    linear_grad_bookkeeping,
    linear_grad_sqnorms,
)
from .projection import project_scores, segmented_power_pass
from .svd import randomized_svd, svd_method, top_eigh
from .trim import trimmed_cross_entropy_backward, trimmed_cross_entropy_forward

__all__ = [
    "StreamingCovariance",
    "conv_grad_bookkeeping",
    "embedding_grad_sqnorms",
    "gradnorm_method",
    "layer_norm_grad_sqnorms",
    "linear_grad_bookkeeping",
    "linear_grad_sqnorms",
    "project_scores",
    "randomized_svd",
    "segmented_power_pass",
    "svd_method",
    "top_eigh",
    "trimmed_cross_entropy_backward",
    "trimmed_cross_entropy_forward",
]
