"""capture_activations: a model's layer output streamed into a shard folder."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from poisonguard._progress import Progress
from poisonguard.sources import ShardSource, as_source, capture_activations
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


def _cnn_data(n: int = 37):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 6, 6, generator=g), torch.arange(n) % 5


def _all(src: ShardSource) -> np.ndarray:
    return np.concatenate([np.asarray(c, dtype=np.float32) for c, _ in src.chunks()])


@pytest.fixture
def cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


def test_conv_maps_are_flattened_with_labels(cnn, tmp_path):
    x, y = _cnn_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    cnn.train()
    src = capture_activations(cnn, loader, "conv", tmp_path / "acts", progress=False, rows_per_shard=16)
    assert isinstance(src, ShardSource)
    assert (src.n_rows, src.n_features, src.dtype) == (37, 4 * 6 * 6, np.float16)
    with torch.no_grad():
        want = cnn.conv(x).flatten(1).half().float().numpy()  # channel-major [B, C·H·W]
    np.testing.assert_allclose(_all(src), want, rtol=2e-3, atol=2e-3)
    assert np.array_equal(np.load(tmp_path / "acts" / "labels.npy"), y.numpy())
    assert np.array_equal(src.labels(), y.numpy())
    assert [s.rows for s in src.shards] == [16, 16, 5]
    assert cnn.training  # mode restored
    assert not cnn.conv._forward_hooks  # hook removed
    assert as_source(tmp_path / "acts").n_rows == 37


def test_later_layers_are_skipped(cnn, tmp_path):
    calls = []
    cnn.fc.register_forward_hook(lambda *a: calls.append(1))
    x, y = _cnn_data(10)
    capture_activations(cnn, DataLoader(TensorDataset(x, y), batch_size=4), "relu", tmp_path / "a", progress=False)
    assert calls == []
    src = capture_activations(cnn, DataLoader(TensorDataset(x, y), batch_size=4), "", tmp_path / "b", progress=False)
    assert src.n_features == 5 and len(calls) == 3  # "" is the whole model


def test_mlp_without_labels_float32_and_max_batches(tmp_path):
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(50, 10)
    loader = DataLoader(TensorDataset(x), batch_size=8)  # batches are (x,): no labels
    src = capture_activations(mlp, loader, "1", tmp_path / "m", dtype=np.float32, max_batches=2, progress=False)
    assert (src.n_rows, src.n_features, src.dtype) == (16, 16, np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_all(src), torch.relu(mlp[0](x[:16])).numpy(), rtol=1e-6, atol=1e-6)
    assert not src.has_labels and src.labels() is None
    assert not (tmp_path / "m" / "labels.npy").exists()


def test_plain_tensor_batches_and_bfloat16(tmp_path):
    mlp = nn.Sequential(nn.Linear(4, 6))
    batches = [torch.randn(3, 4) for _ in range(3)]
    src = capture_activations(mlp, batches, "0", tmp_path / "b", dtype=torch.bfloat16, progress=False)
    chunks = [c for c, _ in src.chunks()]
    assert src.dtype == "bfloat16" and all(c.dtype == torch.bfloat16 for c in chunks)
    with torch.no_grad():
        want = torch.cat([mlp(b) for b in batches]).bfloat16()
    assert torch.equal(torch.cat(chunks), want)


def test_unknown_layer_lists_valid_names(cnn, tmp_path):
    loader = DataLoader(TensorDataset(*_cnn_data(4)), batch_size=2)
    with pytest.raises(ValueError, match=r"no submodule 'cnov'.*did you mean \['conv'\].*'conv', 'relu', 'fc'"):
        capture_activations(cnn, loader, "cnov", tmp_path / "x")
    with pytest.raises(TypeError, match="layer must be a submodule name"):
        capture_activations(cnn, loader, 0, tmp_path / "x")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        capture_activations(lambda v: v, loader, "conv", tmp_path / "x")
    with pytest.raises(ValueError, match="max_batches must be >= 1"):
        capture_activations(cnn, loader, "conv", tmp_path / "x", max_batches=0)
    with pytest.raises(RuntimeError, match="'unused' did not run"):
        capture_activations(cnn, loader, "unused", tmp_path / "y", progress=False)
    assert not cnn.unused._forward_hooks


def test_bad_outputs_batches_and_labels(tmp_path):
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    model = nn.Sequential(Pair())
    with pytest.raises(TypeError, match="returned tuple"):
        capture_activations(model, [torch.zeros(2, 3)], "0", tmp_path / "a", progress=False)
    mlp = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"x or \(x, y\) batches.*dict"):
        capture_activations(mlp, [{"x": torch.zeros(2, 3)}], "0", tmp_path / "b", progress=False)
    with pytest.raises(TypeError, match="integer class ids"):
        capture_activations(mlp, [(torch.zeros(2, 3), torch.zeros(2))], "0", tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="no batches"):
        capture_activations(mlp, [], "0", tmp_path / "d", progress=False)


def test_failure_leaves_no_manifest_and_folder_rules(tmp_path):
    mlp = nn.Sequential(nn.Linear(3, 2))

    def loader():
        yield torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
        raise OSError("dataset broke")

    with pytest.raises(OSError, match="dataset broke"):
        capture_activations(mlp, loader(), "0", tmp_path / "a", progress=False, rows_per_shard=2)
    assert not (tmp_path / "a" / "manifest.json").exists()
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        as_source(tmp_path / "a")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        capture_activations(mlp, [torch.zeros(1, 3)], "0", tmp_path / "a", progress=False)
    src = capture_activations(mlp, [torch.zeros(1, 3)], "0", tmp_path / "a", progress=False, overwrite=True)
    assert src.n_rows == 1 and sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "manifest.json",
        "shard_00000.npy",
    ]


def test_builtin_progress_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    mlp = nn.Sequential(nn.Linear(3, 2))
    loader = DataLoader(TensorDataset(torch.zeros(10, 3)), batch_size=4)
    capture_activations(mlp, loader, "0", tmp_path / "a")
    err = capsys.readouterr().err
    assert "capture 0: 3/3 batches, 10 rows" in err and err.endswith("\n")
    monkeypatch.setattr(Progress, "interval", 0.0)  # draw on every update
    capture_activations(mlp, (b for b in [torch.zeros(2, 3)] * 2), "0", tmp_path / "b")
    err = capsys.readouterr().err
    assert "capture 0: 1 batches, 2 rows" in err and "capture 0: 2 batches, 4 rows" in err  # no total: no len()
    capture_activations(mlp, loader, "0", tmp_path / "c", progress=False)
    assert capsys.readouterr().err == ""


def test_tqdm_is_used_when_installed(tmp_path, monkeypatch):
    events = []

    class FakeTqdm:
        def __init__(self, total, desc, unit, file):
            events.append(("init", total, desc, unit))

        def update(self, n):
            events.append(("update", n))

        def close(self):
            events.append(("close",))

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeTqdm))
    mlp = nn.Sequential(nn.Linear(3, 2))
    loader = DataLoader(TensorDataset(torch.zeros(10, 3)), batch_size=4)
    capture_activations(mlp, loader, "0", tmp_path / "a", max_batches=2)
    assert events == [("init", 2, "capture 0", "batch"), ("update", 1), ("update", 1), ("close",)]
