"""Training-loop integrations (needs torch): per-sample gradient norms and per-sample loss / gradient-norm histories.

``import poisonguard`` works without torch; this subpackage imports torch.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - torch is an optional dependency
    raise ImportError("poisonguard.torch needs PyTorch: pip install 'poisonguard[torch]'") from exc

from .gradnorm import GradNormTracker
from .monitors import GradNormHistory, LossHistory

__all__ = ["GradNormHistory", "GradNormTracker", "LossHistory"]
