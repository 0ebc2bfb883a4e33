"""Training monitors on a BadNets-poisoned digits set: per-sample losses and gradient norms recorded during training,
then flagged, with precision and recall against the known poison.

    python examples/training_monitors.py               # ~1797 digits, 8 epochs, well under a minute on 2 cores
    python examples/training_monitors.py --epochs 4

What it does: scikit-learn's 8×8 digits, 5% of them stamped with a 2×2 white patch in the bottom-right corner and
relabelled to class 0 (``poisonguard.attacks.badnets``); a small CNN trained with Adam, the loader yielding dataset
indices; every step runs inside :class:`poisonguard.torch.GradNormTracker` (per-sample gradient norms from the one
ordinary backward) and records the unreduced losses in a :class:`~poisonguard.torch.LossHistory` and the norms in a
:class:`~poisonguard.torch.GradNormHistory`. At the end three views are scored against the ground truth:

* ``LossOutliers`` (robust per-class z of the mean loss over the early epochs, its default direction "low", and
  "high" for comparison);
* ``GradientOutliers`` (robust per-class z of the mean gradient norm over the early epochs, direction "high");
* the anti-backdoor-learning view, ``LossHistory.early_learners`` (the lowest early losses, same budget as the
  number of poisoned samples would need: here 5% of each class).

The figures are whatever they come out as; the poison is known, so they are honest precision/recall numbers. On
this small set the patch is NOT learned faster than the digits (the poisoned samples start with a higher loss), and
the 90 poisoned samples are a third of their new class 0, which shifts that class's median and MAD: per-class
robust z-scores find few of them here.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import poisonguard as pg
import torch
from poisonguard.torch import GradNormHistory, GradNormTracker, LossHistory
from torch import nn
from torch.nn import functional as F


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.GroupNorm(4, 32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def precision_recall(flagged: np.ndarray, poison: np.ndarray) -> tuple[float, float, int]:
    tp = int((flagged & poison).sum())
    n_flag = int(flagged.sum())
    return (tp / n_flag if n_flag else 0.0), (tp / int(poison.sum()) if poison.any() else 0.0), n_flag


def main(epochs: int = 8, n_samples: int | None = None, batch_size: int = 64, seed: int = 0, verbose: bool = True):
    """Trains, records and scores. Returns ``{"views": {view: (precision, recall, n_flagged)}, "clean_accuracy",
    "histories": (LossHistory, GradNormHistory), "poisoned": [N] bool}``."""
    from sklearn.datasets import load_digits

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is faster (and its sums deterministic)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # [N, 8, 8] in [0, 1]
    labels = digits.target.astype(np.int64)
    if n_samples is not None:
        images, labels = images[:n_samples], labels[:n_samples]
    poisoned = pg.attacks.badnets(images, labels, target=0, fraction=0.05, patch_size=2, value=1.0, seed=seed)
    x = torch.from_numpy(poisoned.images).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.from_numpy(poisoned.labels)
    n = len(y)
    truth = poisoned.mask

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, norms = LossHistory(n), GradNormHistory(n)
    tracker = GradNormTracker(model, loss_reduction="mean")
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]  # the dataset indices of this batch
            opt.zero_grad(set_to_none=True)
            with tracker:
                per_sample = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
                per_sample.mean().backward()
            losses.record(idx, per_sample, epoch=epoch)
            norms.record(idx, tracker.norms, epoch=epoch)
            opt.step()

    torch.set_num_threads(threads)
    with torch.no_grad():
        clean = ~truth
        acc = float((model(x[clean]).argmax(1) == y[clean]).float().mean())
    early = slice(0, max(1, min(3, epochs)))
    flags = {
        "LossOutliers (default: low)": pg.LossOutliers(epochs=early).fit(losses, y).is_poison_,
        "LossOutliers (high)": pg.LossOutliers("high", epochs=early).fit(losses, y).is_poison_,
        "GradientOutliers (default: high)": pg.GradientOutliers(epochs=early).fit(norms, y).is_poison_,
        "early learners (ABL, 5% per class)": np.isin(
            np.arange(n), losses.early_learners(0.05, epochs=early.stop, labels=y)
        ),
    }
    views = {name: precision_recall(f, truth) for name, f in flags.items()}
    if verbose:
        print(poisoned.description)
        print(f"trained {epochs} epochs on {n} samples: accuracy on the clean training samples {acc:.3f}")
        lo, hi = np.nanmedian(losses.values[:, 0][truth]), np.nanmedian(losses.values[:, 0][~truth])
        print(f"median loss in epoch 0: poisoned {lo:.3f}, clean {hi:.3f}")
        print(f"scores over epochs {early.start}..{early.stop - 1}, robust z per (poisoned) label, z = 3.5")
        print(f"{'view':<40} {'flagged':>8} {'precision':>10} {'recall':>8}")
        for name, (p, r, k) in views.items():
            print(f"{name:<40} {k:>8} {p:>10.3f} {r:>8.3f}")
        print(f"({time.perf_counter() - t0:.1f} s)")
    return {"views": views, "clean_accuracy": acc, "histories": (losses, norms), "poisoned": truth}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    main(epochs=args.epochs, seed=args.seed)
