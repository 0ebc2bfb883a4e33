"""Red-team poison generators with known ground truth, for the demo, the tests and the benchmarks.

:func:`badnets` (patch trigger), :func:`blend` (blended trigger) and :func:`label_flip` return a
:class:`PoisonedData` with poisoned copies and the poisoned indices; :func:`apply_trigger` and :func:`apply_blend`
put the same triggers on test images to measure the attack success rate.
"""

from .poison import PoisonedData, apply_blend, apply_trigger, badnets, blend, label_flip

__all__ = ["PoisonedData", "apply_blend", "apply_trigger", "badnets", "blend", "label_flip"]
