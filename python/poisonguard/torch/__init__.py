"""Training-loop integrations for PyTorch (an optional dependency: this subpackage needs ``torch``).

:func:`trimmed_cross_entropy`, :class:`TrimmedCrossEntropyLoss` and :func:`trimmed_loss` implement TRIM-style
trimmed-loss training: each batch's loss is averaged over the rows with the smallest losses only, so a minority of
poisoned (e.g. label-flipped) samples, which tend to have large losses, do not pull the model.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - torch is installed in the test environment
    raise ImportError(
        "poisonguard.torch needs PyTorch, which is an optional dependency: pip install 'poisonguard[torch]' "
        "(or install torch for your platform from pytorch.org)"
    ) from exc

from .trim import TrimmedCrossEntropyLoss, trimmed_cross_entropy, trimmed_loss

__all__ = ["TrimmedCrossEntropyLoss", "trimmed_cross_entropy", "trimmed_loss"]
