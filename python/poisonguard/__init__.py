"""poisonguard: find poisoned training data and hidden backdoors with statistics over a model's representations.

The compiled kernels live in :mod:`poisonguard._core`; array-level operations in :mod:`poisonguard.ops`.
"""

from __future__ import annotations

from ._loader import load_core as _load_core

_core = _load_core()

from . import attacks, ops  # noqa: E402
from .cluster import DensityClustering  # noqa: E402
from .detect import ActivationClustering, GradientOutliers, LossOutliers, SpectralSignature, Spectre  # noqa: E402
from .ops import StreamingCovariance, randomized_svd, top_eigh  # noqa: E402
from .workflow import ScanResult, scan  # noqa: E402

__version__: str = _core.__version__


def has_cuda() -> bool:
    """True when the CUDA kernels were compiled in and a CUDA device is usable now."""
    return bool(_core.built_with_cuda()) and _core.cuda_device_count() > 0


def build_info() -> dict:
    """What was built: ``version``, ``cuda`` (compiled with CUDA kernels), ``cuda_version``, ``cuda_devices``,
    ``blas`` (library, version and configuration), ``blas_threads``, ``threads`` and ``compiler``."""
    info = dict(_core.build_info())
    info["cuda_devices"] = _core.cuda_device_count()
    return info


def get_num_threads() -> int:
    """Threads used by poisonguard's own parallel loops."""
    return int(_core.get_num_threads())


def set_num_threads(n: int) -> None:
    """Sets the threads for poisonguard's loops and its BLAS (``0`` = all cores)."""
    import os

    _core.set_num_threads(int(n))
    _core.blas_set_num_threads(int(n) if n else (os.cpu_count() or 1))


__all__ = [
    "ActivationClustering",
    "DensityClustering",
    "GradientOutliers",
    "LossOutliers",
    "ScanResult",
    "SpectralSignature",
    "Spectre",
    "StreamingCovariance",
    "__version__",
    "attacks",
    "build_info",
    "get_num_threads",
    "has_cuda",
    "ops",
    "randomized_svd",
    "scan",
    "set_num_threads",
    "top_eigh",
]
