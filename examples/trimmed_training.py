"""Trimmed-loss training against a label-flip (availability) attack on scikit-learn's digits.

A small MLP is trained four ways and evaluated on the clean test set: on clean labels with plain cross-entropy (the
baseline), and on a training set where 20% of the labels were flipped to another class, with plain cross-entropy and
with :class:`poisonguard.torch.TrimmedCrossEntropyLoss` at a few trim levels. The trimmed loss averages each
batch over the rows with the smallest losses only, so most flipped samples (large losses once the model has learnt
the clean majority) stop pulling the model. Also printed: the share of flipped samples among the rows dropped in the
last epoch.

    python examples/trimmed_training.py               # ~20-40 s on 2 CPU cores
    python examples/trimmed_training.py --epochs 30 --flip 0.3 --trims 0.2,0.3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from poisonguard.attacks import label_flip
from poisonguard.torch import TrimmedCrossEntropyLoss
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def _model(n_in: int, n_out: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(n_in, 128), torch.nn.ReLU(), torch.nn.Linear(128, n_out))


def train(x, y, flipped, x_test, y_test, criterion, epochs: int, seed: int, batch: int = 64) -> dict:
    """Trains a fresh MLP; returns the clean test accuracy and, for a trimmed loss, the share of flipped samples
    among the rows it dropped in the last epoch."""
    torch.manual_seed(seed)
    model = _model(x.shape[1], 10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    dropped = np.zeros(n, dtype=bool)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            opt.zero_grad()
            loss = criterion(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if epoch == epochs - 1 and getattr(criterion, "kept_", None) is not None:
                dropped[idx.numpy()] = ~criterion.kept_.numpy()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
    precision = float(flipped[dropped].mean()) if dropped.any() else None
    return {"accuracy": acc, "dropped": int(dropped.sum()), "flipped_among_dropped": precision}


def main(
    epochs: int = 60,
    flip: float = 0.2,
    trims: tuple[float, ...] = (0.1, 0.2, 0.3),
    seed: int = 0,
    n_samples: int | None = None,
    verbose: bool = True,
) -> list[dict]:
    digits = load_digits()
    x, y = digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    if n_samples is not None:
        x, y = x[:n_samples], y[:n_samples]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    poisoned = label_flip(y_tr, flip, n_classes=10, seed=seed)
    flipped = poisoned.mask
    xt, xe = torch.from_numpy(x_tr), torch.from_numpy(x_te)
    ye = torch.from_numpy(y_te)
    runs = [("clean labels", "CE", torch.from_numpy(y_tr), torch.nn.CrossEntropyLoss())]
    runs.append((f"{flip:.0%} flipped", "CE", torch.from_numpy(poisoned.labels), torch.nn.CrossEntropyLoss()))
    for trim in trims:
        runs.append(
            (
                f"{flip:.0%} flipped",
                f"trimmed CE, trim={trim}",
                torch.from_numpy(poisoned.labels),
                TrimmedCrossEntropyLoss(trim=trim),
            )
        )
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-128-10 MLP: threads only add synchronisation
    try:
        for data, loss_name, labels, criterion in runs:
            r = train(xt, labels, flipped, xe, ye, criterion, epochs, seed)
            results.append({"data": data, "loss": loss_name, **r})
    finally:
        torch.set_num_threads(threads)
    if verbose:
        print(
            f"digits: {len(x_tr)} train / {len(x_te)} test samples, MLP 64-128-10, {epochs} epochs, Adam, seed {seed}"
        )
        print(
            f"{'training labels':<16} {'loss':<22} {'clean test acc':>14} {'dropped (last ep.)':>19} "
            f"{'flipped among dropped':>22}"
        )
        for r in results:
            share = "" if r["flipped_among_dropped"] is None else f"{r['flipped_among_dropped']:.0%}"
            drop = str(r["dropped"]) if r["loss"] != "CE" else ""
            print(f"{r['data']:<16} {r['loss']:<22} {r['accuracy']:>14.3f} {drop:>19} {share:>22}")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--flip", type=float, default=0.2)
    p.add_argument("--trims", default="0.1,0.2,0.3", help="comma-separated trim levels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    main(a.epochs, a.flip, tuple(float(v) for v in a.trims.split(",")), a.seed)
