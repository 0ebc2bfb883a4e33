"""The demo command: runs end to end, deterministic, writes its files."""

from __future__ import annotations

import json

import numpy as np
from poisonguard import cli
from poisonguard.demo import badnets_digits, run


def test_badnets_digits_ground_truth():
    x, y, idx = badnets_digits(0.05, target=3, seed=1)
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert len(idx) == round(0.05 * 1797)
    assert (y[idx] == 3).all()
    patch = x[idx].reshape(-1, 8, 8)[:, 6:8, 6:8]
    assert (patch == 1.0).all()


def test_demo_writes_results_and_is_deterministic(tmp_path, capsys):
    a = run(out=str(tmp_path / "a"), seed=0)
    b = run(out=None, seed=0)
    assert a["precision"] == b["precision"] and a["recall"] == b["recall"]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["attack"]["poisoned"] == 90
    flags = np.load(tmp_path / "a" / "flags.npy", allow_pickle=False)
    poisoned = np.load(tmp_path / "a" / "poisoned_indices.npy", allow_pickle=False)
    assert flags.shape == (1797,)
    # The caught count reported equals the flags written.
    assert int(flags[poisoned].sum()) == round(summary["recall"] * 90)
    assert "precision" in capsys.readouterr().out


def test_cli_demo(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--fraction", "0.1", "--target", "2"]) == 0
    assert (tmp_path / "d" / "summary.json").exists()
    assert "BadNets" in capsys.readouterr().out
