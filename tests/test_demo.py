"""The demo command: runs end to end, deterministic, writes its files."""

from __future__ import annotations

import json

import numpy as np
from poisonguard import ScanResult, cli
from poisonguard.demo import run


def test_demo_writes_results_and_is_deterministic(tmp_path, capsys):
    a = run(out=str(tmp_path / "a"), seed=0, epochs=3)
    b = run(out=None, seed=0, epochs=3)
    assert a["methods"] == b["methods"] and a["model"] == b["model"]
    demo = json.loads((tmp_path / "a" / "demo.json").read_text())
    assert demo["attack"]["poisoned"] == round(0.05 * 1437)
    res = ScanResult.load(tmp_path / "a")
    poisoned = np.load(tmp_path / "a" / "poisoned_indices.npy", allow_pickle=False)
    for method, row in demo["methods"].items():
        flags = res.is_poison if method == "consensus" else res.flags[method]
        assert row["flagged"] == int(flags.sum())
        assert row["caught"] == int(flags[poisoned].sum())
    assert np.load(tmp_path / "a" / "activations.npy").shape == (1437, 64)
    out = capsys.readouterr().out
    assert "attack success rate" in out and "precision" in out


def test_cli_demo(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--fraction", "0.1", "--target", "2", "--epochs", "2"]) == 0
    assert (tmp_path / "d" / "summary.json").exists()
    assert "BadNets" in capsys.readouterr().out
