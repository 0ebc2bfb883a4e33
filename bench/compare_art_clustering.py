"""poisonguard's ActivationClustering against ART 1.20.1's ActivationDefence on the same saved activations.

Reads the activation sets that ``bench/compare_art.py`` saves (``<data-dir>/<set>/activations.npy``, ``labels.npy``,
``poisoned_indices.npy``, ``meta.json``): the digits demo and Fashion-MNIST under BadNets. On each set: ART's
``ActivationDefence.detect_poison`` with its defaults (PCA to 10, KMeans 2, "smaller") and with each other cluster
analysis and FastICA (a crash is reported as such: ART 1.20.1's ``relative-size`` and ``silhouette-scores`` analyses
fail under numpy >= 2.2), and ``ActivationClustering`` presets — flags against the known poison, flags in the classes
that hold no poison, wall time (median of ``--repeat`` calls after a warm-up) and peak memory (separate untimed run).

    python bench/compare_art_clustering.py                       # sets under bench/data
    python bench/compare_art_clustering.py --sets digits --repeat 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import git_sha, header, machine
from compare_art import ActivationStub, _has_set, _load_set, import_retry, peak_rss_delta, quality

ART_VERSION = "1.20.1"


def art_run(acts: np.ndarray, labels: np.ndarray, n_classes: int, **params):
    """A fresh ``ActivationDefence`` (it caches activations and clusters between calls) and its detection."""
    from art.defences.detector.poison import ActivationDefence

    onehot = np.eye(n_classes, dtype=np.float32)[labels]
    defence = ActivationDefence(ActivationStub(acts, n_classes), acts, onehot)
    _, is_clean = defence.detect_poison(**params)
    return np.asarray(is_clean) == 0


def methods_for(acts: np.ndarray, labels: np.ndarray, n_classes: int, with_art: bool) -> list[tuple[str, object]]:
    """(name, fn returning the flags) for every method."""
    pg = import_retry("poisonguard")
    ac = pg.ActivationClustering
    out: list[tuple[str, object]] = []
    if with_art:
        art_cfgs = [
            ("ART ActivationDefence (defaults: PCA, smaller)", {}),
            ("ART ActivationDefence relative-size", {"cluster_analysis": "relative-size"}),
            ("ART ActivationDefence distance", {"cluster_analysis": "distance"}),
            ("ART ActivationDefence silhouette-scores", {"cluster_analysis": "silhouette-scores"}),
            ("ART ActivationDefence FastICA, smaller", {"reduce": "FastICA"}),
        ]
        for name, params in art_cfgs:
            out.append((name, lambda p=params: art_run(acts, labels, n_classes, **p)))

    def fit(**kw):
        return lambda: ac(**kw).fit(acts, labels, n_classes=n_classes).is_poison_.copy()

    out += [
        ("AC default (pca, kmeans, relative-size + gate)", fit()),
        ("AC analysis=smaller (+ gate)", fit(analysis="smaller")),
        ("AC analysis=silhouette (+ gate)", fit(analysis="silhouette")),
        ("AC analysis=distance (+ gate)", fit(analysis="distance")),
        ("AC reduce=ica (+ gate)", fit(reduce="ica")),
        ("AC method=hdbscan (+ gate)", fit(method="hdbscan")),
        ("AC method=dbscan (eps auto, + gate)", fit(method="dbscan")),
        ("AC preset=art (smaller)", fit(preset="art")),
        ("AC preset=art relative-size", fit(preset="art", analysis="relative-size")),
        ("AC preset=art distance", fit(preset="art", analysis="distance")),
        ("AC preset=art silhouette", fit(preset="art", analysis="silhouette")),
        ("AC preset=art ica", fit(preset="art", reduce="ica")),
    ]
    return out


def _timed(fn, repeat: int) -> dict:
    """Median / p20 / p80 of ``repeat`` calls after one warm-up call; a crash is returned as its message."""
    try:
        result = fn()
    except Exception as exc:  # ART's analyses crash under numpy >= 2.2: reported, not fatal
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:110]}"}
    times, results = [], [result]
    for _ in range(repeat):
        t0 = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - t0)
    t = np.asarray(times)
    return {
        "result": result,
        "all": results,
        "median": float(np.median(t)),
        "p20": float(np.percentile(t, 20)),
        "p80": float(np.percentile(t, 80)),
    }


def compare(name: str, data: dict, repeat: int, with_art: bool, memory: bool) -> dict:
    acts, labels, indices, meta = data["acts"], data["labels"], data["indices"], data["meta"]
    n, d = acts.shape
    n_classes = int(labels.max()) + 1
    target = int(meta["target"])
    truth = np.zeros(n, dtype=bool)
    truth[indices] = True
    in_target = int((labels == target).sum())
    print(f"\n## {name}: [{n}, {d}], {meta['attack']}; target {target} ({in_target} samples, {truth.sum()} poison)")
    rows = []
    for method, fn in methods_for(acts, labels, n_classes, with_art):
        r = _timed(fn, repeat)
        row = {"method": method}
        if "error" in r:
            row["error"] = r["error"]
        else:
            row.update(quality(r["result"], truth, labels, target))
            row.update({k: r[k] for k in ("median", "p20", "p80")})
            row["flags"] = r["result"]
            # unseeded methods (ART's KMeans) differ between calls: the range of flagged / caught over all calls
            flagged = [int(f.sum()) for f in r["all"]]
            caught = [int((f & truth).sum()) for f in r["all"]]
            row["runs"] = f"{min(flagged)}-{max(flagged)} / {min(caught)}-{max(caught)}"
            row["rss_mib"] = peak_rss_delta(fn) if memory else None
        rows.append(row)
        print(format_row(row), flush=True)
    agreement = None
    by = {r["method"]: r for r in rows}
    art = by.get("ART ActivationDefence (defaults: PCA, smaller)")
    ours = by.get("AC preset=art (smaller)")
    if art is not None and "flags" in art and ours is not None and "flags" in ours:
        same = [bool(np.array_equal(art["flags"][labels == c], ours["flags"][labels == c])) for c in range(n_classes)]
        agreement = {
            "differing_samples": int((art["flags"] != ours["flags"]).sum()),
            "identical_classes": int(sum(same)),
            "n_classes": n_classes,
            "target_identical": same[target],
        }
        print(agreement_line(agreement))
    return {"name": name, "n": n, "d": d, "meta": meta, "in_target": in_target, "rows": rows, "agreement": agreement}


def agreement_line(a: dict) -> str:
    return (
        f"AC preset=art vs ART defaults: {a['differing_samples']} samples flagged differently; identical flags in "
        f"{a['identical_classes']}/{a['n_classes']} classes (target class identical: {a['target_identical']}). "
        "ART's KMeans is unseeded: a class that is one blob is cut at a different place each run."
    )


def _f(v, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


COLUMNS = [
    ("method", lambda r: r["method"]),
    ("flagged", lambda r: r["flagged"]),
    ("caught", lambda r: r["caught"]),
    ("precision", lambda r: _f(r["precision"], ".4f")),
    ("recall", lambda r: _f(r["recall"], ".4f")),
    ("flags in clean classes", lambda r: f"{r['clean_lost_other']} ({r['clean_lost_other_pct']:.2f}%)"),
    ("all calls: flagged / caught", lambda r: r["runs"]),
    ("median s", lambda r: f"{r['median']:.3f}"),
    ("p20-p80 s", lambda r: f"{r['p20']:.3f}-{r['p80']:.3f}"),
    ("peak RSS MiB", lambda r: _f(r.get("rss_mib"), ".1f")),
]


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['method']:<50} CRASH {r['error']}"
    return f"{r['method']:<50} " + " ".join(f"{get(r)!s:>14}" for h, get in COLUMNS[1:])


def markdown(results: list[dict], command: str) -> str:
    import poisonguard

    lines = [
        "## ActivationClustering vs ART 1.20.1 ActivationDefence (`bench/compare_art_clustering.py`)",
        "",
        f"Command: `{command}`; {_dt.date.today()}, commit `{git_sha()}`, poisonguard {poisonguard.__version__}, "
        f"numpy {np.__version__}, {machine()}.",
        "",
        "Same saved penultimate activations for every method; times: median of the calls after one warm-up (the "
        "flag columns are the warm-up call's; *all calls* gives the range over every call); ART: "
        "`detect_poison()` on a fresh `ActivationDefence` with a stand-in classifier returning the saved activations. "
        "*Flags in clean classes*: flags outside the poison's target class (all clean samples lost for nothing). "
        "Peak RSS: VmHWM during a separate call minus VmRSS before it.",
        "",
    ]
    for res in results:
        m = res["meta"]
        lines += [
            f"### {res['name']}: [{res['n']}, {res['d']}]",
            "",
            f"{m['attack']}; target class {m['target']} ({res['in_target']} samples, "
            f"{m['n_poison'] / res['in_target']:.1%} of them poison).",
            "",
            "| " + " | ".join(h for h, _ in COLUMNS) + " |",
            "|---|" + "---:|" * (len(COLUMNS) - 1),
        ]
        for r in res["rows"]:
            if "error" in r:
                err = r["error"].replace("`", "'")
                lines.append(f"| {r['method']} | crash: {err} |" + " |" * (len(COLUMNS) - 2))
            else:
                lines.append("| " + " | ".join(str(get(r)) for _, get in COLUMNS) + " |")
        if res["agreement"] is not None:
            lines += ["", "- " + agreement_line(res["agreement"])]
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="bench/data", help="folder holding the activation sets")
    p.add_argument("--sets", default="digits,fashion_p05,fashion_p10")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per method (after one warm-up)")
    p.add_argument("--no-art", action="store_true", help="skip ART even when installed")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--out", default=None, help="markdown summary (default <data-dir>/compare_art_clustering.md)")
    args = p.parse_args()
    command = " ".join(["python bench/compare_art_clustering.py", *sys.argv[1:]])
    import_retry("poisonguard")
    header("compare_art_clustering: ActivationClustering vs ART ActivationDefence")
    with_art = False
    if not args.no_art:
        try:
            import art

            with_art = art.__version__ == ART_VERSION
            print(f"# ART {art.__version__}" + ("" if with_art else f" (not {ART_VERSION}: ART rows skipped)"))
        except ImportError:
            print(f"# ART not installed (pip install adversarial-robustness-toolbox=={ART_VERSION}): rows skipped")
    results = []
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        folder = Path(args.data_dir) / name
        if not _has_set(folder):
            print(f"# {folder}: no saved set (run bench/compare_art.py to build it), skipped")
            continue
        results.append(compare(name, _load_set(folder), args.repeat, with_art, not args.no_memory))
    out = Path(args.out) if args.out else Path(args.data_dir) / "compare_art_clustering.md"
    out.write_text(markdown(results, command))
    print(f"\nmarkdown summary written to {out}")


if __name__ == "__main__":
    main()
