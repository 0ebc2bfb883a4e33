"""scan(): shared passes, consensus, cross-reference, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from poisonguard import ActivationClustering, ScanResult, SpectralSignature, Spectre, scan


def _poisoned(rng, n=6000, d=32, g=4, n_poison=150, shift=2.0):
    """A BadNets-like all-to-one attack: ``n_poison`` samples of the other classes get a common trigger offset and
    are relabelled to class 1 (they keep their source classes' variation)."""
    y = rng.integers(0, g, n)
    x = rng.standard_normal((n, d)) + 3 * rng.standard_normal((g, d))[y]
    poison = np.sort(rng.choice(np.flatnonzero(y != 1), n_poison, replace=False)) if n_poison else np.zeros(0, int)
    x[poison] += 3 * shift * rng.standard_normal(d)
    y[poison] = 1
    return x.astype(np.float32), y, poison


def test_scan_equals_the_detectors_run_alone(rng):
    x, y, poison = _poisoned(rng)
    res = scan(x, y, spectre={"n_components": 8})
    alone_spectral = SpectralSignature("auto").fit(x, y)
    alone_spectre = Spectre("auto", n_components=8).fit(x, y)
    alone_clustering = ActivationClustering().fit(x, y)
    np.testing.assert_allclose(res.scores["spectral"], alone_spectral.scores_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.scores["spectre"], alone_spectre.scores_, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.flags["clustering"], alone_clustering.is_poison_)
    assert res.consensus == "2"
    np.testing.assert_array_equal(res.is_poison, res.votes >= 2)
    assert res.is_poison[poison].mean() >= 0.95
    assert res.flags["spectral"][poison].mean() >= 0.95 and res.flags["clustering"][poison].mean() >= 0.95
    assert res.meta["n_components"] == 10  # the most any method needs (clustering's 10)


def test_consensus_rules_and_tables(rng):
    x, y, _ = _poisoned(rng)
    res = scan(x, y, consensus="all", spectre={"n_components": 8})
    f = res.flags
    np.testing.assert_array_equal(res.is_poison, f["spectral"] & f["spectre"] & f["clustering"])
    np.testing.assert_array_equal(res.votes, f["spectral"].astype(int) + f["spectre"] + f["clustering"])
    anyone = scan(x, y, consensus="any", spectre={"n_components": 8})
    np.testing.assert_array_equal(anyone.is_poison, f["spectral"] | f["spectre"] | f["clustering"])
    assert [(a["a"], a["b"]) for a in res.agreement] == [
        ("spectral", "spectre"),
        ("spectral", "clustering"),
        ("spectre", "clustering"),
    ]
    assert res.agreement[0]["both"] == int((f["spectral"] & f["spectre"]).sum())
    table = res.overlap_table()
    assert "votes: 1:" in table and "consensus (all)" in table
    assert f"{int((f['spectral'] & f['clustering']).sum())}" in table.splitlines()[1]
    assert sum(r["samples"] for r in res.per_class) == len(x)
    assert "consensus" in res.table()
    assert len(res.clean_indices()) == len(x) - res.is_poison.sum()
    one = scan(x, y, methods=("spectral",))
    assert one.consensus == "any" and (one.is_poison == one.flags["spectral"]).all()


def test_losses_and_gradient_norms_are_more_evidence(rng):
    x, y, poison = _poisoned(rng, n=3000)
    losses = 2.0 + 0.1 * rng.standard_normal(len(y))
    losses[poison] = 1e-2  # learned fast: unusually low loss
    norms = 1.0 + 0.1 * rng.standard_normal(len(y))
    norms[poison] *= 8  # unusually large gradients
    res = scan(x, y, methods=("spectral",), losses=losses, grad_norms=norms)
    assert list(res.flags) == ["spectral", "loss", "gradient"] and res.consensus == "2"
    assert res.flags["loss"][poison].mean() > 0.9 and res.flags["gradient"][poison].mean() > 0.9
    assert res.is_poison[poison].mean() > 0.9 and res.reports["loss"]["method"]
    with pytest.raises(ValueError):
        scan(x, y, methods=("spectral",), losses=losses[:-1])


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
        scan(x, y, consensus=4)
    with pytest.raises(ValueError, match="consensus"):
        scan(x, y, methods=("spectral", "spectre"), consensus=3)
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
    assert "votes:" in out and "consensus (2)" in out and "clustering" in out
    assert ScanResult.load(tmp_path / "o").consensus == "2"
    assert cli.main([*argv, "--methods", "spectral", "--expected-poison-fraction", "0.1"]) == 0
    np.save(tmp_path / "losses.npy", rng.standard_normal(len(y)))
    np.save(tmp_path / "norms.npy", rng.standard_normal((len(y), 3)))
    more = ["--losses", str(tmp_path / "losses.npy"), "--grad-norms", str(tmp_path / "norms.npy")]
    assert cli.main([*argv, "--methods", "spectral", *more]) == 0
    assert list(ScanResult.load(tmp_path / "o").flags) == ["spectral", "loss", "gradient"]
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
