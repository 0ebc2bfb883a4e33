"""Training-loop integrations for PyTorch (an optional dependency: this subpackage needs ``torch``;
``import poisonguard`` works without it).

- :func:`trimmed_cross_entropy`, :class:`TrimmedCrossEntropyLoss` and :func:`trimmed_loss` implement TRIM-style
  trimmed-loss training: each batch's loss is averaged over the rows with the smallest losses only, so a minority of
  poisoned (e.g. label-flipped) samples, which tend to have large losses, do not pull the model.
- :class:`GradNormTracker` gives per-sample gradient norms from one ordinary backward, without per-sample gradients.
- :class:`LossHistory` and :class:`GradNormHistory` record per-sample values over epochs and flag outliers.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - torch is installed in the test environment
    raise ImportError(
        "poisonguard.torch needs PyTorch, which is an optional dependency: pip install 'poisonguard[torch]' "
        "(or install torch for your platform from pytorch.org)"
    ) from exc

from ._threads import share_torch_openmp
from .gradnorm import GradNormTracker
from .monitors import GradNormHistory, LossHistory
from .trim import TrimmedCrossEntropyLoss, trimmed_cross_entropy, trimmed_loss

share_torch_openmp()

__all__ = [
    "GradNormHistory",
    "GradNormTracker",
    "LossHistory",
    "TrimmedCrossEntropyLoss",
    "trimmed_cross_entropy",
    "trimmed_loss",
]
