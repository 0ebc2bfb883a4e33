"""scan(): shared passes, consensus, cross-reference, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from poisonguard import ScanResult, SpectralSignature, Spectre, scan


def _poisoned(rng, n=6000, d=32, g=4, n_poison=150, shift=2.0):
    y = rng.integers(0, g, n)
    x = rng.standard_normal((n, d)) + 3 * rng.standard_normal((g, d))[y]
    poison = np.sort(rng.choice(np.flatnonzero(y == 1), n_poison, replace=False))
    x[poison] += shift * rng.standard_normal(d)
    return x.astype(np.float32), y, poison


def test_scan_equals_the_detectors_run_alone(rng):
    x, y, poison = _poisoned(rng)
    res = scan(x, y, spectre={"n_components": 8})
    alone_spectral = SpectralSignature("auto").fit(x, y)
    alone_spectre = Spectre("auto", n_components=8).fit(x, y)
    np.testing.assert_allclose(res.scores["spectral"], alone_spectral.scores_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.scores["spectre"], alone_spectre.scores_, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(res.is_poison, res.flags["spectral"] | res.flags["spectre"])
    assert res.is_poison[poison].mean() >= 0.95
    assert res.meta["n_components"] == 8


def test_consensus_rules_and_tables(rng):
    x, y, _ = _poisoned(rng)
    both = scan(x, y, consensus="all", spectre={"n_components": 8})
    np.testing.assert_array_equal(both.is_poison, both.flags["spectral"] & both.flags["spectre"])
    two = scan(x, y, consensus=2, spectre={"n_components": 8})
    np.testing.assert_array_equal(two.is_poison, both.is_poison)
    (ag,) = both.agreement
    assert ag["both"] == int((both.flags["spectral"] & both.flags["spectre"]).sum())
    assert sum(r["samples"] for r in both.per_class) == len(x)
    assert "consensus" in both.table()
    assert len(both.clean_indices()) == len(x) - both.is_poison.sum()


def test_save_and_load_round_trip(rng, tmp_path):
    x, y, _ = _poisoned(rng, n=2000)
    res = scan(x, y, methods=("spectral",), expected_poison_fraction=0.05)
    res.save(tmp_path / "out")
    back = ScanResult.load(tmp_path / "out")
    np.testing.assert_array_equal(back.is_poison, res.is_poison)
    np.testing.assert_array_equal(back.scores["spectral"], res.scores["spectral"])
    assert back.per_class == res.per_class
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_flagged"] == int(res.is_poison.sum())
    with pytest.raises(ValueError, match=r"summary\.json"):
        ScanResult.load(tmp_path)


def test_bad_arguments(rng):
    x, y, _ = _poisoned(rng, n=500, n_poison=10)
    with pytest.raises(ValueError, match="methods"):
        scan(x, y, methods=("nope",))
    with pytest.raises(ValueError, match="methods"):
        scan(x, y, methods=())
    with pytest.raises(ValueError, match="consensus"):
        scan(x, y, consensus=3)
    with pytest.raises(ValueError, match="rows"):
        scan(x, y[:-1])


def test_cli_scan(rng, tmp_path, capsys):
    from poisonguard import cli

    x, y, _ = _poisoned(rng, n=2000)
    np.save(tmp_path / "acts.npy", x)
    np.save(tmp_path / "labels.npy", y)
    argv = ["scan", str(tmp_path / "acts.npy"), "--labels", str(tmp_path / "labels.npy"), "--out", str(tmp_path / "o")]
    assert cli.main([*argv, "--consensus", "2"]) == 0
    out = capsys.readouterr().out
    assert "Jaccard" in out and "consensus" in out
    assert ScanResult.load(tmp_path / "o").consensus == "2"
    assert cli.main([*argv, "--methods", "spectral", "--expected-poison-fraction", "0.1"]) == 0
    with pytest.raises(SystemExit):
        cli.main([*argv, "--expected-poison-fraction", "lots"])


def test_scan_progress_lines(rng, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain stderr line
    x, y, _ = _poisoned(rng, n=1000, n_poison=10)
    scan(x, y, methods=("spectral",), progress=True, chunk_rows=300)
    err = capsys.readouterr().err
    assert "pass 1/2 statistics: 1000/1000 rows" in err and "pass 2/2 projections: 1000/1000 rows" in err
    scan(x, y, methods=("spectral",))
    assert capsys.readouterr().err == ""


def test_disk_backed_projections_give_the_same_result(rng, monkeypatch):
    from poisonguard.detect import _twopass

    x, y, _ = _poisoned(rng, n=3000)
    in_memory = scan(x, y, spectre={"n_components": 8})
    monkeypatch.setattr(_twopass, "_IN_MEMORY_BYTES", 0)  # projections go to a temporary file
    on_disk = scan(x, y, spectre={"n_components": 8})
    for m in in_memory.scores:
        np.testing.assert_array_equal(on_disk.scores[m], in_memory.scores[m])
    np.testing.assert_array_equal(on_disk.is_poison, in_memory.is_poison)
