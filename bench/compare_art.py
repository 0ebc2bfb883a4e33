"""poisonguard against ART 1.20.1's SpectralSignatureDefense on the same saved penultimate activations.

Three activation sets: the digits demo (``poisonguard.demo.run``) and Fashion-MNIST under BadNets (3x3 white patch,
bottom-right corner, one target class) at each ``--fractions`` share of the 60k training set, each from a small CNN
trained on the poisoned set (the sacrificial model). On each set: ART's defence with its defaults, poisonguard's
``SpectralSignature`` (ART preset, paper rule, "auto"), ``Spectre`` (0.05, "auto") and ``scan`` — flags against the
known poison, wall time (median of ``--repeat`` rounds, one call per method in shuffled order, after a warm-up) and
peak memory (two measures, separate untimed runs).

    python bench/compare_art.py                          # build the sets (2-8 min on 2 cores), compare
    python bench/compare_art.py --skip-train             # reuse the activations saved under --work
    python bench/compare_art.py --fractions 0.05 --epochs 2 --work /tmp/cmp

Needs ``adversarial-robustness-toolbox==1.20.1`` and the Fashion-MNIST IDX files (Debian ``dataset-fashion-mnist``
or ``$FASHION_MNIST_DIR``); without them the ART rows / Fashion sets are skipped with a message.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import json
import math
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import git_sha, header, machine, peak_rss_delta, record, timeit

ART_VERSION = "1.20.1"
TIE_RTOL = 1e-4  # a flag disagreement counts as a tie when both scores are this close (relative) to their cutoff


# -- plumbing -----------------------------------------------------------------------------------------------------


def import_retry(name: str, tries: int = 6, wait: float = 10.0):
    """Imports ``name``, retrying while the package is being reinstalled by someone else."""
    for attempt in range(tries):
        try:
            return importlib.import_module(name)
        except ImportError as e:
            if attempt == tries - 1:
                raise
            for mod in [m for m in sys.modules if m == "poisonguard" or m.startswith("poisonguard.")]:
                del sys.modules[mod]
            print(f"# import {name} failed ({e}); retrying in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)
    raise AssertionError("unreachable")


def peak_traced(fn: Callable[[], object]) -> float:
    """MiB: tracemalloc's peak during ``fn()`` — Python objects and numpy buffers only, no native allocations."""
    gc.collect()
    tracemalloc.start()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del out
    return peak / 2**20


# -- activation sets ----------------------------------------------------------------------------------------------


def _save_set(folder: Path, acts: np.ndarray, labels: np.ndarray, indices: np.ndarray, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "activations.npy", np.ascontiguousarray(acts, dtype=np.float32))
    np.save(folder / "labels.npy", labels.astype(np.int64))
    np.save(folder / "poisoned_indices.npy", indices.astype(np.int64))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def _load_set(folder: Path) -> dict:
    acts = np.load(folder / "activations.npy", allow_pickle=False)
    labels = np.load(folder / "labels.npy", allow_pickle=False).astype(np.int64)
    indices = np.load(folder / "poisoned_indices.npy", allow_pickle=False).astype(np.int64)
    meta = json.loads((folder / "meta.json").read_text())
    return {"acts": np.ascontiguousarray(acts, dtype=np.float32), "labels": labels, "indices": indices, "meta": meta}


def _has_set(folder: Path) -> bool:
    names = ("activations.npy", "labels.npy", "poisoned_indices.npy", "meta.json")
    return all((folder / n).exists() for n in names)


def build_digits(folder: Path, epochs: int) -> None:
    demo = import_retry("poisonguard.demo")
    print(f"\n## building: digits demo, poisonguard.demo.run(out={str(folder)!r}, epochs={epochs})")
    summary = demo.run(out=str(folder), epochs=epochs)
    meta = {
        "name": "digits",
        "dataset": summary["dataset"],
        "attack": "BadNets 2x2 white patch (demo defaults)",
        "fraction": summary["attack"]["fraction"],
        "target": summary["attack"]["target"],
        "n_poison": summary["attack"]["poisoned"],
        "clean_accuracy": summary["model"]["clean_accuracy"],
        "attack_success_rate": summary["model"]["attack_success_rate"],
        "epochs": epochs,
        "model": "demo SmallCNN (conv16-conv32-pool-fc64), penultimate 64",
        "seconds": summary["seconds"],
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def _fashion_model():
    from torch import nn

    class FashionCNN(nn.Module):
        """The demo's CNN adapted to 28x28: strided convolutions instead of full-resolution ones + pooling, so an
        epoch over 60k images takes 2-30 s on these 2 shared cores; penultimate layer of 64 as in the demo."""

        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),  # 14x14
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # 7x7
                nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(),
            )  # fmt: skip
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.features(x))

    return FashionCNN()


def _batched(fn: Callable, x: np.ndarray, batch: int = 2000) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([fn(torch.from_numpy(x[i : i + batch, None])).numpy() for i in range(0, len(x), batch)])


def build_fashion(folder: Path, fraction: float, target: int, epochs: int, seed: int, data_dir: str | None) -> None:
    import fashion_mnist
    import torch
    from torch import nn

    badnets = import_retry("poisonguard.attacks").badnets
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    x_train, y_train = fashion_mnist.load("train", data_dir)
    x_test, y_test = fashion_mnist.load("test", data_dir)
    x_train = x_train.astype(np.float32) / 255.0
    x_test = x_test.astype(np.float32) / 255.0
    poisoned = badnets(x_train, y_train, target, fraction, patch_size=3, position="bottom-right", value=1.0, seed=seed)
    print(f"\n## building: Fashion-MNIST, {poisoned.description}")
    torch.manual_seed(seed)
    model = _fashion_model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(poisoned.images[:, None])
    yt = torch.from_numpy(poisoned.labels)
    batch = 256
    for epoch in range(epochs):
        te = time.perf_counter()
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch):
            b = perm[i : i + batch]
            opt.zero_grad()
            loss = loss_fn(model(xt[b]), yt[b])
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(xt):.4f} ({time.perf_counter() - te:.1f} s)")
    model.eval()
    clean_acc = float((_batched(model, x_test).argmax(1) == y_test).mean())
    others = x_test[y_test != target]
    asr = float((_batched(model, poisoned.trigger(others)).argmax(1) == target).mean())
    acts = _batched(model.features, poisoned.images)
    seconds = time.perf_counter() - t0
    print(
        f"sacrificial CNN: clean test accuracy {clean_acc:.4f} (10k test set), attack success rate {asr:.4f} "
        f"({len(others)} triggered test images of other classes), {seconds:.1f} s; activations {acts.shape}"
    )
    meta = {
        "name": folder.name,
        "dataset": "Fashion-MNIST train (60000)",
        "attack": poisoned.description,
        "fraction": fraction,
        "target": target,
        "n_poison": len(poisoned.indices),
        "clean_accuracy": clean_acc,
        "attack_success_rate": asr,
        "epochs": epochs,
        "model": "conv16/s2-conv32/s2-fc64 (penultimate 64), Adam 2e-3, batch 256",
        "seed": seed,
        "seconds": seconds,
    }
    _save_set(folder, acts, poisoned.labels, poisoned.indices, meta)


# -- methods ------------------------------------------------------------------------------------------------------


class ActivationStub:
    """All of an ART classifier that ``SpectralSignatureDefense.detect_poison`` (1.20.1) touches: ``layer_names`` (it
    asks for the last layer), ``nb_classes`` (to split by class) and ``get_activations(x, layer, batch_size)``, which
    here returns the saved activations, so no forward pass is timed."""

    def __init__(self, acts: np.ndarray, nb_classes: int) -> None:
        self._acts = acts
        self.layer_names = ["penultimate"]
        self.nb_classes = nb_classes

    def get_activations(self, x, layer, batch_size: int = 128, framework: bool = False) -> np.ndarray:
        if len(x) != len(self._acts):
            raise ValueError(f"x has {len(x)} rows, the saved activations {len(self._acts)}")
        return self._acts


def art_defence(acts: np.ndarray, labels: np.ndarray, n_classes: int):
    from art.defences.detector.poison import SpectralSignatureDefense

    onehot = np.eye(n_classes, dtype=np.float32)[labels]  # ART's y_train: one-hot (argmax'ed by segment_by_class)
    return SpectralSignatureDefense(ActivationStub(acts, n_classes), acts, onehot)  # defaults: 0.33, 1.5


def methods_for(acts: np.ndarray, labels: np.ndarray, n_classes: int, with_art: bool, eps_class: float) -> list[tuple]:
    """(name, fn, flags-from-result) for every method; ``fn`` does the whole detection and returns its result.
    ``eps_class``: the poisoned share of the target class, the ε of the papers' rule (an oracle value, told to
    the "ε=share" rows only)."""
    pg = import_retry("poisonguard")
    ss, sp, scan = pg.SpectralSignature, pg.Spectre, pg.scan
    out = []
    if with_art:
        defence = art_defence(acts, labels, n_classes)
        out.append(("ART SpectralSignatureDefense (0.33)", defence.detect_poison, lambda r: np.asarray(r[1]) == 0))

    def fit(det):
        return lambda: det.fit(acts, labels, n_classes=n_classes)

    def flags(d):
        return d.is_poison_.copy()

    out += [
        ("SpectralSignature(0.33, art)", fit(ss(0.33, preset="art")), flags),
        ("SpectralSignature(0.05) paper", fit(ss(0.05)), flags),
        ("SpectralSignature(auto)", fit(ss("auto")), flags),
        (f"SpectralSignature(ε={eps_class:.3f}) paper", fit(ss(eps_class)), flags),
        ("Spectre(0.05)", fit(sp(0.05)), flags),
        (f"Spectre(ε={eps_class:.3f})", fit(sp(eps_class)), flags),
        ("Spectre(auto)", fit(sp("auto")), flags),
    ]
    run_scan = lambda: scan(acts, labels, methods=("spectral", "spectre"), n_classes=n_classes)  # noqa: E731
    out += [
        ("scan(auto): spectral", run_scan, lambda r: r.flags["spectral"].copy()),
        ("scan(auto): spectre", run_scan, lambda r: r.flags["spectre"].copy()),
        ("scan(auto): consensus (2 votes)", run_scan, lambda r: r.is_poison.copy()),
    ]
    return out


def quality(flags: np.ndarray, truth: np.ndarray, labels: np.ndarray, target: int) -> dict:
    n_poison = int(truth.sum())
    flagged = int(flags.sum())
    caught = int((flags & truth).sum())
    others = labels != target  # poison carries the target label: every flag elsewhere is a clean sample lost
    lost_other = int((flags & others).sum())
    return {
        "flagged": flagged,
        "caught": caught,
        "precision": caught / flagged if flagged else math.nan,
        "recall": caught / n_poison if n_poison else math.nan,
        "clean_lost": flagged - caught,
        "clean_lost_other": lost_other,
        "clean_lost_other_pct": 100.0 * lost_other / max(int(others.sum()), 1),
    }


def art_agreement(acts: np.ndarray, labels: np.ndarray, n_classes: int, art_flags: np.ndarray) -> dict:
    """Flags of SpectralSignature(0.33, preset="art") vs ART's; for each disagreement, how far both scores sit from
    their class's cutoff (ART's scores recomputed with its own ``spectral_signature_scores``, untimed)."""
    from art.defences.detector.poison import SpectralSignatureDefense

    det = import_retry("poisonguard").SpectralSignature(0.33, preset="art").fit(acts, labels, n_classes=n_classes)
    q = max(1.0 - 1.5 * 0.33, 0.0)
    art_scores = np.zeros(len(labels))
    art_cut = np.full(n_classes, np.inf)
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            s = SpectralSignatureDefense.spectral_signature_scores(acts[idx])[:, 0].astype(np.float64)
            art_scores[idx] = s
            art_cut[c] = np.quantile(s, q)
    diff = np.flatnonzero(det.is_poison_ != art_flags)
    rows = []
    for i in diff:
        c = labels[i]
        in_c = art_scores[labels == c]
        rows.append(
            {
                "index": int(i),
                "class": int(c),
                "art_gap": abs(art_scores[i] - art_cut[c]) / abs(art_cut[c]),
                "pg_gap": abs(det.scores_[i] - det.threshold_[c]) / abs(det.threshold_[c]),
                # samples between this one and the cutoff in ART's own ordering
                "rank_gap": int(abs(np.sum(in_c < art_scores[i]) - np.sum(in_c < art_cut[c]))),
            }
        )
    rel = np.abs(det.scores_ - art_scores) / np.maximum(np.abs(art_scores), 1e-30)
    return {
        "disagreements": len(diff),
        "ties": sum(r["art_gap"] <= TIE_RTOL and r["pg_gap"] <= TIE_RTOL for r in rows),
        "rows": rows,
        "max_score_rel_diff": float(rel.max()) if len(rel) else 0.0,
    }


# -- comparison ---------------------------------------------------------------------------------------------------


def compare(name: str, data: dict, repeat: int, with_art: bool, save_rows: bool = True) -> dict:
    acts, labels, meta = data["acts"], data["labels"], data["meta"]
    n, d = acts.shape
    n_classes = int(max(labels.max() + 1, 10))
    target = int(meta["target"])
    truth = np.zeros(n, dtype=bool)
    truth[data["indices"]] = True
    in_target = int((labels == target).sum())
    print(f"\n## {name}: activations [{n}, {d}] float32, {n_classes} classes")
    print(
        f"attack: {meta['attack']}; {int(truth.sum())} poisoned = {truth.mean():.1%} of the set, "
        f"{truth.sum() / in_target:.1%} of target class {target} ({in_target} samples)"
    )
    print(
        f"sacrificial model: {meta['model']}, {meta['epochs']} epochs: clean test accuracy "
        f"{meta['clean_accuracy']:.4f}, attack success rate {meta['attack_success_rate']:.4f}"
    )
    eps_class = round(float(truth.sum() / in_target), 3)
    methods = methods_for(acts, labels, n_classes, with_art, eps_class)
    calls = {id(fn): fn for _, fn, _ in methods}  # the three scan rows share one call
    results = {key: fn() for key, fn in calls.items()}  # correctness first (and the warm-up): flags, then timings
    rows = []
    for mname, fn, get_flags in methods:
        rows.append({"method": mname, "key": id(fn), "flags": get_flags(results[id(fn)])})
    del results
    agreement = art_agreement(acts, labels, n_classes, rows[0]["flags"]) if with_art else None
    # Rounds of one call per method, so that the load of this shared machine, which drifts over seconds, weighs on
    # every method alike; the order is shuffled each round (fixed seed) so that no method always follows the same
    # one. A call that follows a different method runs colder than one repeated back to back (poisonguard's spectral
    # fit: ~0.04 s vs ~0.02 s on Fashion-MNIST, with only a few hundred page faults either way), so the back-to-back
    # time (``_harness.timeit``) is measured too and shown as "warm".
    times: dict[int, list[float]] = {key: [] for key in calls}
    order = np.random.default_rng(0)
    keys = list(calls)
    for _ in range(repeat):
        for i in order.permutation(len(keys)):
            key, fn = keys[i], calls[keys[i]]
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    timed = {}
    for key, t in times.items():
        warm = timeit(calls[key], repeat=repeat, warmup=1)
        timed[key] = {
            **_stats(t),
            "warm_median": warm["median"],
            "rss_mib": peak_rss_delta(calls[key]),
            "traced_mib": peak_traced(calls[key]),
        }
    for r in rows:
        r.update(quality(r["flags"], truth, labels, target), **timed[r["key"]])
    table = format_table(rows)
    print(table)
    if agreement is not None:
        print(agreement_line(agreement))
    for r in rows if save_rows else []:
        note = (
            f"flagged={r['flagged']} precision={r['precision']:.4f} recall={r['recall']:.4f} "
            f"clean_lost={r['clean_lost']} clean_class_lost_pct={r['clean_lost_other_pct']:.2f} "
            f"peak_rss_mib={_fmt_mib(r['rss_mib'])} tracemalloc_mib={r['traced_mib']:.1f} "
            f"warm_back_to_back_median_s={r['warm_median']:.6f} timing=interleaved rounds"
        )
        record("compare_art", f"{name} {n}x{d}", r["method"], r, note)
    return {"name": name, "n": n, "d": d, "meta": meta, "rows": rows, "agreement": agreement, "in_target": in_target}


def _stats(times: list[float]) -> dict:
    """Median and p20 / p80 seconds, as ``_harness.timeit`` reports them."""
    t = np.asarray(times)
    return {"median": float(np.median(t)), "p20": float(np.percentile(t, 20)), "p80": float(np.percentile(t, 80))}


def _fmt_mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _fmt(v: float, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


COLUMNS = [
    ("method", "<36", lambda r: r["method"]),
    ("flagged", ">8", lambda r: r["flagged"]),
    ("caught", ">7", lambda r: r["caught"]),
    ("precision", ">9", lambda r: _fmt(r["precision"], ".4f")),
    ("recall", ">7", lambda r: _fmt(r["recall"], ".4f")),
    ("clean lost", ">10", lambda r: r["clean_lost"]),
    ("lost in clean classes", ">21", lambda r: f"{r['clean_lost_other']} ({r['clean_lost_other_pct']:.2f}%)"),
    ("median s", ">9", lambda r: f"{r['median']:.4f}"),
    ("p20-p80 s", ">15", lambda r: f"{r['p20']:.4f}-{r['p80']:.4f}"),
    ("warm median s", ">13", lambda r: f"{r['warm_median']:.4f}"),
    ("peak RSS MiB", ">12", lambda r: _fmt_mib(r["rss_mib"])),
    ("tracemalloc MiB", ">15", lambda r: f"{r['traced_mib']:.1f}"),
]


def format_table(rows: list[dict]) -> str:
    lines = [" ".join(format(h, f) for h, f, _ in COLUMNS)]
    lines += [" ".join(format(str(get(r)), f) for _, f, get in COLUMNS) for r in rows]
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    align = "|" + "|".join("---" if f.startswith("<") else "---:" for _, f, _ in COLUMNS) + "|"
    body = ["| " + " | ".join(str(get(r)) for _, _, get in COLUMNS) + " |" for r in rows]
    return "\n".join([head, align, *body])


def agreement_line(a: dict) -> str:
    s = (
        f"SpectralSignature(0.33, art) vs ART flags: {a['disagreements']} disagreements, {a['ties']} of them ties at "
        f"the quantile cutoff (both scores within {TIE_RTOL:g} relative of their cutoff); max relative score "
        f"difference {a['max_score_rel_diff']:.2e}"
    )
    for r in a["rows"][:10]:
        s += (
            f"\n  sample {r['index']} (class {r['class']}): ART score {r['art_gap']:.2e} from its cutoff, poisonguard "
            f"{r['pg_gap']:.2e}; {r['rank_gap']} samples between it and the cutoff"
        )
    return s


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets, every set; nothing here feeds back into a method's parameters."""
    out = []
    for res in results:
        by = {r["method"]: r for r in res["rows"]}
        art = next((r for m, r in by.items() if m.startswith("ART")), None)
        if art is not None:
            for m in ("SpectralSignature(0.33, art)", "SpectralSignature(0.05) paper", "SpectralSignature(auto)"):
                ratio = art["median"] / by[m]["median"]
                warm = art["warm_median"] / by[m]["warm_median"]
                out.append(
                    {
                        "set": res["name"],
                        "what": f"speed: ART detect_poison / {m} fit, interleaved (warm back to back: {warm:.1f}x)",
                        "value": f"{ratio:.1f}x",
                        "target": ">= 10x",
                        "pass": ratio >= 10,
                    }
                )
            for m in (
                "SpectralSignature(auto)",
                "Spectre(auto)",
                "scan(auto): spectral",
                "scan(auto): consensus (2 votes)",
            ):
                out.append(
                    {
                        "set": res["name"],
                        "what": f"clean classes lose (share of their samples flagged): {m}",
                        "value": f"{by[m]['clean_lost_other_pct']:.2f}%",
                        "target": "<= 1%",
                        "pass": by[m]["clean_lost_other_pct"] <= 1.0,
                    }
                )
                p, pa = by[m]["precision"], art["precision"]
                ratio = p / pa if pa and not math.isnan(p) else math.nan
                extra = " (0 flagged: precision undefined)" if by[m]["flagged"] == 0 else ""
                out.append(
                    {
                        "set": res["name"],
                        "what": f"precision: {m} / ART default ({_fmt(p, '.4f')} / {_fmt(pa, '.4f')}){extra}",
                        "value": f"{_fmt(ratio, '.1f')}x",
                        "target": ">= 5x",
                        "pass": bool(ratio >= 5) if not math.isnan(ratio) else False,
                    }
                )
        if res["name"].startswith("fashion"):
            n_poison = int(res["meta"]["n_poison"])
            ceiling = min(n_poison, math.floor(1.5 * 0.05 * res["in_target"] + 1e-9)) / n_poison
            for m in ("SpectralSignature(0.05) paper", "Spectre(0.05)"):
                rec = by[m]["recall"]
                out.append(
                    {
                        "set": res["name"],
                        "what": f"recall: {m} (rule flags 7.5% of each class: ceiling {ceiling:.4f} here)",
                        "value": f"{rec:.4f}",
                        "target": ">= 0.95",
                        "pass": rec >= 0.95,
                    }
                )
            for m in [k for k in by if "ε=" in k]:
                rec = by[m]["recall"]
                out.append(
                    {
                        "set": res["name"],
                        "what": f"recall: {m} (the papers' ε: the target class's poisoned share, told)",
                        "value": f"{rec:.4f}",
                        "target": ">= 0.95",
                        "pass": rec >= 0.95,
                    }
                )
    return out


def write_markdown(path: Path, results: list[dict], summary: list[dict], command: str, peak_note: str) -> None:
    import poisonguard

    lines = [
        "## poisonguard vs ART 1.20.1 spectral signatures (`bench/compare_art.py`)",
        "",
        f"Command: `{command}`; {_dt.date.today()}, commit `{git_sha()}`, poisonguard {poisonguard.__version__}, "
        f"{machine()}.",
        "",
        "Every method reads the same saved penultimate activations (float32). Times: median of the rounds after a "
        "warm-up (p20-p80 given; one call of every method per round, in shuffled order); *warm*: median of the same "
        "number of calls back to back (`_harness.timeit`). Both time the whole detection only — "
        "ART's `detect_poison()` with a stand-in classifier returning the saved activations, poisonguard's `fit` / "
        "`scan` from the array. " + peak_note,
        "",
    ]
    for res in results:
        m = res["meta"]
        lines += [
            f"### {res['name']}: [{res['n']}, {res['d']}]",
            "",
            f"{m['attack']}; target class {m['target']} ({res['in_target']} samples, "
            f"{m['n_poison'] / res['in_target']:.1%} poison). Sacrificial model: {m['model']}, {m['epochs']} "
            f"epochs: clean test accuracy {m['clean_accuracy']:.4f}, attack success rate "
            f"{m['attack_success_rate']:.4f}.",
            "",
            markdown_table(res["rows"]),
            "",
        ]
        if res["agreement"] is not None:
            lines += ["- " + agreement_line(res["agreement"]).replace("\n  ", "\n  - "), ""]
    lines += ["### Targets", "", "| set | what | value | target | |", "|---|---|---:|---|---|"]
    lines += [f"| {t['set']} | {t['what']} | {t['value']} | {t['target']} | {_pm(t)} |" for t in summary]
    path.write_text("\n".join(lines) + "\n")


def _pm(t: dict) -> str:
    return "PASS" if t["pass"] else "MISS"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(Path(__file__).parent / "data"), help="folder of the activation sets")
    p.add_argument("--skip-train", action="store_true", help="reuse the activation sets saved under --work")
    p.add_argument("--fractions", default="0.05,0.1", help="BadNets shares of the Fashion-MNIST training set")
    p.add_argument("--epochs", type=int, default=5, help="Fashion-MNIST CNN epochs")
    p.add_argument("--digits-epochs", type=int, default=30)
    p.add_argument("--target", type=int, default=0, help="Fashion-MNIST target class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=7, help="timed rounds (after one warm-up call each)")
    p.add_argument("--no-record", action="store_true", help="do not append rows to bench/results.csv")
    p.add_argument("--fashion-dir", default=None, help="IDX folder (default $FASHION_MNIST_DIR or the Debian path)")
    args = p.parse_args()
    command = " ".join(["python bench/compare_art.py", *sys.argv[1:]])
    work = Path(args.work)
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]

    import_retry("poisonguard")
    header("compare_art: poisonguard vs ART SpectralSignatureDefense")
    try:
        import art

        with_art = art.__version__ == ART_VERSION
        print(f"# ART {art.__version__}" + ("" if with_art else f" (not {ART_VERSION}: ART rows skipped)"))
    except ImportError:
        with_art = False
        print(f"# ART not installed (pip install adversarial-robustness-toolbox=={ART_VERSION}): ART rows skipped")

    sets: list[tuple[str, Path]] = [("digits", work / "digits")]
    if not (work / "digits" / "meta.json").exists() or not args.skip_train:
        if args.skip_train:
            print("# --skip-train: no saved digits set, building it")
        build_digits(work / "digits", args.digits_epochs)
    for frac in fractions:
        folder = work / f"fashion_p{round(frac * 100):02d}"
        if args.skip_train and _has_set(folder):
            sets.append((folder.name, folder))
            continue
        if args.skip_train:
            print(f"# --skip-train: no saved set in {folder}, building it")
        try:
            build_fashion(folder, frac, args.target, args.epochs, args.seed, args.fashion_dir)
        except FileNotFoundError as e:
            print(f"# Fashion-MNIST unavailable, {folder.name} skipped: {e}")
            continue
        sets.append((folder.name, folder))

    peak_note = (
        "Peak memory, in separate untimed runs: *peak RSS* = VmHWM during the call minus VmRSS before it (VmHWM reset "
        "through /proc/self/clear_refs after gc + malloc_trim; counts native buffers), *tracemalloc* = Python and "
        "numpy allocations only. The input activations are loaded beforehand and excluded from both."
    )
    print(f"\n# {peak_note}")
    results = [compare(name, _load_set(folder), args.repeat, with_art, not args.no_record) for name, folder in sets]
    summary = targets(results)
    print("\n## targets")
    for t in summary:
        print(f"{_pm(t)}  [{t['set']}] {t['what']}: {t['value']} (target {t['target']})")
    md = work / "compare_art.md"
    write_markdown(md, results, summary, command, peak_note)
    print(f"\nmarkdown summary written to {md}" + ("" if args.no_record else "; rows appended to bench/results.csv"))


if __name__ == "__main__":
    main()
