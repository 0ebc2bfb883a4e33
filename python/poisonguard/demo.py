"""``poisonguard demo``: BadNets on sklearn's bundled digits, a small CNN trained on the poisoned set as the
sacrificial model, its penultimate activations scanned with spectral signatures and SPECTRE.

Prints the model's clean accuracy and attack success rate, then precision / recall / flag counts of each method
against the known poison, and writes everything to a folder. Deterministic for a seed; about a minute on 2 cores.
"""

from __future__ import annotations

import json
import time

import numpy as np

from .attacks import badnets
from .workflow import scan


def _data(fraction: float, target: int, seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # [1797, 8, 8] in [0, 1]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_train = int(0.8 * len(labels))
    tr, te = order[:n_train], order[n_train:]
    poisoned = badnets(images[tr], labels[tr], target, fraction, patch_size=2, value=1.0, seed=seed)
    return poisoned, images[te], labels[te]


def _model():
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
            )  # fmt: skip
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    return SmallCNN()


def run(
    out: str | None = "poisonguard-demo",
    fraction: float = 0.05,
    target: int = 0,
    seed: int = 0,
    epochs: int = 30,
) -> dict:
    import torch
    from torch import nn

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    poisoned, x_test, y_test = _data(fraction, target, seed)
    x_train = torch.from_numpy(poisoned.images[:, None])
    y_train = torch.from_numpy(poisoned.labels)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(model(x_train[b]), y_train[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acts = model.features(x_train).numpy()  # penultimate layer [N, 64]
        xt = torch.from_numpy(x_test[:, None])
        clean_acc = float((model(xt).argmax(1).numpy() == y_test).mean())
        keep = y_test != target
        triggered = torch.from_numpy(poisoned.trigger(x_test[keep])[:, None])
        asr = float((model(triggered).argmax(1).numpy() == target).mean())
    t_train = time.perf_counter() - t0

    result = scan(acts, poisoned.labels, methods=("spectral", "spectre", "clustering"), spectre={"n_components": 16})
    truth = poisoned.mask
    n_poison = int(truth.sum())
    print(
        f"BadNets on sklearn digits: {len(truth)} training samples, {n_poison} poisoned ({fraction:.0%}) "
        f"relabelled to class {target}; 2x2 white trigger"
    )
    print(f"sacrificial CNN: clean test accuracy {clean_acc:.3f}, attack success rate {asr:.3f} ({t_train:.1f} s)")
    print(f"scan of the penultimate activations [{acts.shape[0]}, {acts.shape[1]}] ({result.seconds:.2f} s):")
    print(f"{'method':<10}{'flagged':>9}{'caught':>8}{'precision':>11}{'recall':>8}{'clean lost':>12}")
    methods = {**result.flags, "consensus": result.is_poison}
    per_method = {}
    for name, flags in methods.items():
        tp = int((flags & truth).sum())
        fl = int(flags.sum())
        row = {
            "flagged": fl,
            "caught": tp,
            "precision": tp / fl if fl else 1.0,
            "recall": tp / n_poison if n_poison else 1.0,
            "clean_lost": fl - tp,
        }
        per_method[name] = row
        print(f"{name:<10}{fl:>9}{tp:>8}{row['precision']:>11.3f}{row['recall']:>8.3f}{row['clean_lost']:>12}")
    print(result.table())
    print("flagged by both (rows x columns):")
    print(result.overlap_table())
    summary = {
        "dataset": "sklearn digits (train split)",
        "attack": {"kind": "badnets", "fraction": fraction, "target": target, "seed": seed, "poisoned": n_poison},
        "model": {"clean_accuracy": clean_acc, "attack_success_rate": asr, "epochs": epochs},
        "methods": per_method,
        "seconds": time.perf_counter() - t0,
    }
    if out:
        path = result.save(out)
        np.save(path / "poisoned_indices.npy", poisoned.indices)
        np.save(path / "activations.npy", acts)
        (path / "demo.json").write_text(json.dumps(summary, indent=2))
        print(f"results written to {path}/")
    return summary
