"""Per-sample gradient norms: the linear-map kernels against the float64 reference (both forms, every dtype, strides,
degenerate shapes) and GradNormTracker against torch.func.vmap(grad) on MLPs, CNNs and a small transformer."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALL_INPUTS, INPUT_IDS, make_input, to_float64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from poisonguard import _core
from poisonguard._reference import _linear_grad_sqnorms
from poisonguard.ops import gradnorm_method, linear_grad_sqnorms

torch = pytest.importorskip("torch")
from poisonguard.torch import GradNormTracker  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402
from torch.nn import functional as F  # noqa: E402

# Max relative error per sample against float64 on the same (rounded) values: squared norms of sums of T products.
KTOL = {"float64": 1e-11, "float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5}
FORMS = ("ghost", "direct", "auto")


def _max_rel(got, want) -> float:
    got, want = to_float64(got), to_float64(want)
    scale = np.maximum(np.abs(want), 1e-300)
    return float(np.max(np.abs(got - want) / scale)) if want.size else 0.0


def _check(a, g, method, dtype, bias=True):
    w, b, used = linear_grad_sqnorms(a, g, method=method, bias=bias)
    ref_w, ref_b = _linear_grad_sqnorms(a, g)
    assert used in ("ghost", "direct")
    if method != "auto":
        assert used == method
    assert tuple(w.shape) == (a.shape[0],)
    assert _max_rel(w, ref_w) <= KTOL[dtype], (method, dtype, _max_rel(w, ref_w))
    if bias:
        assert _max_rel(b, ref_b) <= KTOL[dtype]
    else:
        assert b is None
    return used


# -- kernels ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", FORMS)
@pytest.mark.parametrize(("lib", "dtype"), ALL_INPUTS, ids=INPUT_IDS)
def test_kernel_matches_reference(rng, lib, dtype, method):
    for b, t, din, dout in [(5, 7, 9, 11), (3, 1, 17, 4), (4, 33, 3, 2), (1, 6, 40, 70), (2, 3, 0, 4)]:
        a = make_input(rng.standard_normal((b, t, din)), lib, dtype)
        g = make_input(rng.standard_normal((b, t, dout)), lib, dtype)
        _check(a, g, method, dtype)


@pytest.mark.parametrize("method", FORMS)
def test_kernel_2d_input_is_one_position(rng, method):
    a = rng.standard_normal((6, 13)).astype(np.float32)
    g = rng.standard_normal((6, 5)).astype(np.float32)
    w, b, _ = linear_grad_sqnorms(a, g, method=method, bias=True)
    want = (a.astype(np.float64) ** 2).sum(1) * (g.astype(np.float64) ** 2).sum(1)
    assert _max_rel(w, want) <= 2e-6
    assert _max_rel(b, (g.astype(np.float64) ** 2).sum(1)) <= 2e-6


@pytest.mark.parametrize("method", FORMS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernel_strided_inputs(rng, method, dtype):
    base_a = rng.standard_normal((6, 14, 20)).astype(dtype)
    base_g = rng.standard_normal((6, 9, 14)).astype(dtype)
    a = base_a[::2, ::2, 1::2]  # [3, 7, 10], every stride > 1
    g = base_g[::2].transpose(0, 2, 1)[:, ::2, :]  # [3, 7, 9], transposed sample blocks
    _check(a, g, method, dtype)
    ta = torch.from_numpy(base_a).transpose(1, 2)  # torch strided view [6, 20, 14]
    tg = torch.from_numpy(rng.standard_normal((6, 7, 20)).astype(dtype)).transpose(1, 2)
    _check(ta, tg, method, dtype)
    # zero batch stride (a broadcast input)
    bc = np.broadcast_to(rng.standard_normal((1, 5, 4)).astype(dtype), (3, 5, 4))
    _check(bc, rng.standard_normal((3, 5, 6)).astype(dtype), method, dtype)


@pytest.mark.parametrize("method", FORMS)
def test_kernel_empty_and_degenerate(method):
    for b, t, din, dout in [(0, 3, 4, 5), (3, 0, 4, 5), (2, 4, 3, 0), (1, 1, 1, 1)]:
        a = np.ones((b, t, din), dtype=np.float32)
        g = np.full((b, t, dout), 2.0, dtype=np.float32)
        w, bias, _ = linear_grad_sqnorms(a, g, method=method, bias=True)
        ref_w, ref_b = _linear_grad_sqnorms(a, g)
        np.testing.assert_allclose(w, ref_w, rtol=1e-6)
        np.testing.assert_allclose(bias, ref_b, rtol=1e-6)
        assert w.dtype == np.float64 and w.shape == (b,)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(0, 4),
    t=st.integers(1, 12),
    din=st.integers(1, 12),
    dout=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_kernel_fuzz(b, t, din, dout, seed):
    r = np.random.default_rng(seed)
    a, g = r.standard_normal((b, t, din)), r.standard_normal((b, t, dout))
    for method in FORMS:
        _check(a, g, method, "float64")


def test_method_choice_cost_model():
    assert gradnorm_method(1, 1024, 1024) == "ghost"
    assert gradnorm_method(1024, 27, 32) == "direct"  # early conv layer: many positions, small maps
    assert gradnorm_method(128, 256, 256) == "ghost"
    assert gradnorm_method(4096, 64, 64) == "direct"
    # the switch sits where the estimated multiply-adds cross, the ghost form's weighted by 1.15
    for t, din, dout in [(64, 96, 96), (128, 128, 128), (100, 150, 120), (60, 80, 70)]:
        ghost = 1.15 * (t * t * (din + dout) / 2 + t * t)
        direct = (t + 1) * din * dout
        assert gradnorm_method(t, din, dout) == ("ghost" if ghost <= direct else "direct")
    assert gradnorm_method(128, 128, 128) == "direct"  # a near tie: one GEMM beats two SYRKs here
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 400)).astype(np.float32)
    g = rng.standard_normal((2, 3, 300)).astype(np.float32)
    assert linear_grad_sqnorms(a, g)[2] == gradnorm_method(3, 400, 300)


def test_kernel_bad_input(rng):
    a = rng.standard_normal((3, 4, 5)).astype(np.float32)
    g = rng.standard_normal((3, 4, 6)).astype(np.float32)
    with pytest.raises(TypeError, match="same dtype"):
        linear_grad_sqnorms(a, g.astype(np.float64))
    with pytest.raises(ValueError, match="agree in B and T"):
        linear_grad_sqnorms(a, g[:, :3])
    with pytest.raises(ValueError, match="agree in B and T"):
        linear_grad_sqnorms(a, g[:2])
    with pytest.raises(ValueError, match="method"):
        linear_grad_sqnorms(a, g, method="fast")
    with pytest.raises(ValueError, match=r"\[B, T, d\]"):
        linear_grad_sqnorms(a[None], g[None])
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        linear_grad_sqnorms(a.astype(np.int32), g.astype(np.int32))
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        linear_grad_sqnorms(a.tolist(), g)
    with pytest.raises(TypeError, match="both be numpy arrays or both torch"):
        linear_grad_sqnorms(torch.from_numpy(a), g)
    with pytest.raises(ValueError, match=">= 0"):
        gradnorm_method(-1, 3, 3)
    with pytest.raises(TypeError, match="integer"):
        gradnorm_method(1.5, 3, 3)
    with pytest.raises(TypeError, match="same dtype"):  # C++ repeats the check
        _core.gradnorm_linear(a, g.astype(np.float64), "auto", np.empty(3), None, False)
    with pytest.raises(ValueError, match="weight_sq"):
        _core.gradnorm_linear(a, g, "auto", np.empty(2), None, False)


def test_torch_input_returns_torch(rng):
    a = torch.from_numpy(rng.standard_normal((4, 3, 5)).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((4, 3, 2)).astype(np.float32))
    w, b, _ = linear_grad_sqnorms(a, g, bias=False)
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float64 and b is None


# -- tracker vs vmap(grad) ----------------------------------------------------------------------------------------
def _vmap_norms(model: nn.Module, x, y, reduction="mean") -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_one(p, xi, yi):
        out = functional_call(model, {**p, **buffers}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    sq = sum(v.reshape(v.shape[0], -1).double().pow(2).sum(1) for v in grads.values())
    return sq.sqrt()


def _tracked(model, x, y, reduction="mean", method="auto"):
    with GradNormTracker(model, loss_reduction=reduction, method=method) as tr:
        F.cross_entropy(model(x), y, reduction=reduction).backward()
    return tr


class TinyTransformer(nn.Module):
    """Embedding + pre-norm attention block (hand-written multi-head attention from Linear layers) + MLP + head."""

    def __init__(self, vocab=23, d=16, heads=2, classes=3, padding_idx=0):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 2 * d)
        self.ff2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.emb(tokens)
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        h = h + self.ff2(F.gelu(self.ff1(self.ln2(h))))
        return self.head(h.mean(dim=1))


class TorchEncoder(nn.Module):
    """Embedding + nn.TransformerEncoderLayer (nn.MultiheadAttention inside) + head."""

    def __init__(self, vocab=23, d=16, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=24, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.layer(self.emb(tokens)).mean(dim=1))


class CrossAttention(nn.Module):
    """Sequence-first nn.MultiheadAttention with kdim/vdim (separate q/k/v weights), a key padding mask and weights."""

    def __init__(self, d=8, kd=5, vd=6, classes=3):
        super().__init__()
        self.kv = nn.Linear(4, kd + vd)
        self.kd = kd
        self.att = nn.MultiheadAttention(d, 2, kdim=kd, vdim=vd)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x [B, T, 4 + d]
        ctx = self.kv(x[..., :4])
        q = x[..., 4:].transpose(0, 1)
        k, v = ctx[..., : self.kd].transpose(0, 1), ctx[..., self.kd :].transpose(0, 1)
        pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        pad[:, -1] = True
        out, w = self.att(q, k, v, key_padding_mask=pad)
        return self.head(out.mean(dim=0)) + w.sum() * 0


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, stride=2),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, dilation=2, groups=2, padding=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(8, 6, (2, 3), stride=(1, 2), bias=False),
        nn.Flatten(),
        nn.Linear(6 * 3 * 1, 4),
    )
    cnn1d = nn.Sequential(nn.Conv1d(3, 6, 5, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 12, 4))
    seq = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 4))
    tokens = torch.randint(0, 6, (6, 9))  # small id range: repeated tokens, some padding (id 0)
    return {
        "mlp": (mlp, torch.randn(7, 10), torch.randint(0, 4, (7,))),
        "cnn": (cnn, torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))),
        "cnn1d": (cnn1d, torch.randn(4, 3, 12), torch.randint(0, 4, (4,))),
        "seq_linear": (seq, torch.randn(5, 6, 5), torch.randint(0, 4, (5,))),
        "transformer": (TinyTransformer(), tokens, torch.randint(0, 3, (6,))),
        "torch_encoder": (TorchEncoder(), tokens, torch.randint(0, 3, (6,))),
        "cross_attention": (CrossAttention(), torch.randn(5, 7, 12), torch.randint(0, 3, (5,))),
    }


_VMAP_CACHE: dict = {}


def _vmap_reference(kind: str) -> torch.Tensor:
    """vmap(grad) norms of a fresh ``_models()[kind]`` (the same seeded weights every time), computed once."""
    if kind not in _VMAP_CACHE:
        _VMAP_CACHE[kind] = _vmap_norms(*_models()[kind])
    return _VMAP_CACHE[kind]


@pytest.mark.parametrize("method", FORMS)
@pytest.mark.parametrize(
    "kind", ["mlp", "cnn", "cnn1d", "seq_linear", "transformer", "torch_encoder", "cross_attention"]
)
def test_tracker_matches_vmap(kind, method):
    model, x, y = _models()[kind]
    want = _vmap_reference(kind)
    tr = _tracked(model, x, y, method=method)
    got = tr.norms
    assert got.shape == (x.shape[0],) and got.dtype == torch.float64
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= 1e-5, (kind, method, err)
    # the per-layer norms add up (in squares) to the total
    total = sum(v.pow(2) for v in tr.layer_norms.values()).sqrt()
    torch.testing.assert_close(total, got, rtol=1e-12, atol=0)
    assert set(tr.methods) == set(tr.layer_norms)
    if method != "auto":
        assert all(m in (method, "exact") for m in tr.methods.values())


def test_tracker_float64_model_is_exact():
    model, x, y = _models()["transformer"]
    model = model.double()
    want = _vmap_norms(model, x, y)
    got = _tracked(model, x, y).norms
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-10


def test_tracker_sum_reduction_and_scale():
    model, x, y = _models()["mlp"]
    mean = _tracked(model, x, y, "mean").norms
    total = _tracked(model, x, y, "sum").norms
    torch.testing.assert_close(mean, total, rtol=1e-5, atol=0)
    # a "sum" loss tracked as if it were a mean is off by exactly B
    with GradNormTracker(model, loss_reduction="mean") as tr:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    torch.testing.assert_close(tr.norms, total * x.shape[0], rtol=1e-6, atol=0)


def test_tracker_embedding_repeated_tokens_exact():
    emb = nn.Embedding(5, 3)
    tokens = torch.tensor([[1, 1, 1, 2], [3, 4, 3, 0]])
    g = torch.randn(2, 4, 3, dtype=torch.float64)
    emb = emb.double()
    with GradNormTracker(emb, loss_reduction="sum") as tr:
        (emb(tokens) * g).sum().backward()
    want0 = g[0, :3].sum(0).pow(2).sum() + g[0, 3].pow(2).sum()
    want1 = (g[1, 0] + g[1, 2]).pow(2).sum() + g[1, 1].pow(2).sum() + g[1, 3].pow(2).sum()
    torch.testing.assert_close(tr.norms.pow(2), torch.stack([want0, want1]), rtol=1e-12, atol=0)


def test_tracker_frozen_params_skipped():
    model, x, y = _models()["cnn"]
    model[0].weight.requires_grad_(False)
    model[1].requires_grad_(False)
    model[5].weight.requires_grad_(False)  # no bias either: the layer drops out
    want = _vmap_norms(model, x, y)
    tr = _tracked(model, x, y)
    assert "5" not in tr.layer_norms and "1" not in tr.layer_norms
    assert float((tr.norms - want).abs().max() / want.abs().max()) <= 1e-5


def test_tracker_new_step_resets():
    model, x, y = _models()["mlp"]
    with GradNormTracker(model) as tr:
        F.cross_entropy(model(x), y).backward()
        first = tr.norms.clone()
        F.cross_entropy(model(x[:3]), y[:3]).backward()
        second = tr.norms
    assert second.shape == (3,)
    torch.testing.assert_close(second, _vmap_norms(model, x[:3], y[:3]), rtol=1e-5, atol=0)
    assert first.shape == (7,)


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _swapped(model):
    return sum("forward" in m.__dict__ for m in model.modules())


def test_tracker_hooks_and_forwards_removed_on_exit_and_exception():
    model, x, y = _models()["seq_linear"]  # two Linear and a LayerNorm (forwards swapped)
    before = _hook_count(model)
    with GradNormTracker(model):
        assert _hook_count(model) == before and _swapped(model) == 3
    assert _hook_count(model) == before and _swapped(model) == 0
    cnn = _models()["cnn"][0]  # convolutions (swapped) and a GroupNorm (forward hook)
    before_cnn = _hook_count(cnn)
    with GradNormTracker(cnn):
        assert _hook_count(cnn) == before_cnn + 1
    assert _hook_count(cnn) == before_cnn and _swapped(cnn) == 0
    with pytest.raises(RuntimeError, match="boom"), GradNormTracker(model):
        model(x)
        raise RuntimeError("boom")
    assert _hook_count(model) == before and _swapped(model) == 0
    # outside the block nothing is recorded
    tr = GradNormTracker(model)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="no per-sample norms"):
        _ = tr.norms
    # an instance-level forward the module already had is put back
    own = model[0].forward
    model[0].forward = own
    with GradNormTracker(model):
        assert model[0].forward is not own
    assert model[0].__dict__["forward"] is own


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (nn.BatchNorm1d(4), "BatchNorm mixes the samples"),
        (nn.MultiheadAttention(4, 2, add_bias_kv=True), "add_bias_kv"),
        (nn.Conv3d(2, 2, 1), "Conv3d"),
        (nn.GRU(4, 4), "GRU"),
    ],
)
def test_tracker_unsupported_module_errors(module, match):
    model = nn.Sequential(nn.Linear(4, 4), module)
    with pytest.raises(ValueError, match=match):
        GradNormTracker(model)
    frozen = nn.Sequential(nn.Linear(4, 4), module.requires_grad_(False))
    GradNormTracker(frozen)  # frozen parameters are skipped: no error


def test_tracker_shared_and_reused_errors():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="shared weights"):
        GradNormTracker(nn.Sequential(lin, nn.ReLU(), lin))
    head = nn.Linear(4, 4, bias=False)
    head.weight = lin.weight  # a Linear tied to another Linear
    with pytest.raises(ValueError, match="tied"):
        GradNormTracker(nn.ModuleDict({"lin": lin, "head": head}))

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.lin(x))

    model = Reuse()
    with pytest.raises(ValueError, match="more than once"), GradNormTracker(model):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        GradNormTracker(nn.Embedding(4, 2, scale_grad_by_freq=True))


def test_tracker_bad_arguments():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        GradNormTracker("model")
    with pytest.raises(ValueError, match="loss_reduction"):
        GradNormTracker(nn.Linear(2, 2), loss_reduction="none")
    with pytest.raises(ValueError, match="method"):
        GradNormTracker(nn.Linear(2, 2), method="fast")


# -- CUDA (skipped without a device) ------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("method", FORMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_kernel_cuda_matches_reference(rng, method, dtype):
    for b, t, din, dout in [(5, 7, 9, 11), (3, 1, 17, 4), (4, 33, 3, 2), (2, 0, 3, 3), (0, 3, 3, 3)]:
        a = make_input(rng.standard_normal((b, t, din)), "torch", dtype)
        g = make_input(rng.standard_normal((b, t, dout)), "torch", dtype)
        g_strided = g.cuda().transpose(1, 2).contiguous().transpose(1, 2)  # column-major samples
        w, _, _ = linear_grad_sqnorms(a.cuda(), g_strided, method=method)
        ref_w, ref_b = _linear_grad_sqnorms(a, g)
        assert _max_rel(w.cpu(), ref_w) <= KTOL[dtype]
        w2, b2, _ = linear_grad_sqnorms(a.cuda(), g.cuda(), method=method, bias=True)
        assert _max_rel(w2.cpu(), ref_w) <= KTOL[dtype] and _max_rel(b2.cpu(), ref_b) <= KTOL[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_tracker_cuda_matches_cpu(kind):
    model, x, y = _models()[kind]
    want = _tracked(model, x, y).norms
    model = model.cuda()
    got = _tracked(model, x.cuda(), y.cuda()).norms
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=0)


def test_tracker_attention_partly_frozen_and_forward_restored():
    model, x, y = _models()["torch_encoder"]
    att = model.layer.self_attn
    att.in_proj_weight.requires_grad_(False)  # only in_proj_bias and out_proj train in the attention
    want = _vmap_norms(model, x, y)
    tr = _tracked(model, x, y)
    assert float((tr.norms - want).abs().max() / want.abs().max()) <= 1e-5
    assert "forward" not in att.__dict__  # the class's forward again
    with pytest.raises(RuntimeError, match="boom"), GradNormTracker(model):
        assert "forward" in att.__dict__
        raise RuntimeError("boom")
    assert "forward" not in att.__dict__
