"""Poison generators: exact ground truth, copies, determinism, dtypes, layouts and every validation error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from poisonguard.attacks import PoisonedData, apply_blend, apply_trigger, badnets, blend, label_flip

LAYOUTS = {
    # layout: (shape of 5 images of 6x7 pixels, channels_last argument)
    "HW": ((5, 6, 7), None),
    "HWC": ((5, 6, 7, 3), True),
    "CHW": ((5, 3, 6, 7), False),
}


def make_images(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    """Random images that never reach the dtype's max (ints) or 1.0 (floats), so a stamped patch is visible."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.integers(0, 200, size=shape).astype(dtype)
    return rng.uniform(0.0, 0.9, size=shape).astype(dtype)


def canonical(x: np.ndarray, layout: str) -> np.ndarray:
    """[N, H, W, C] view of images in ``layout``."""
    if layout == "HW":
        return x[..., None]
    if layout == "CHW":
        return np.moveaxis(x, 1, -1)
    return x


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target  # [1797, 8, 8] float64 in 0..16, [1797] int64


@pytest.fixture
def small() -> tuple[np.ndarray, np.ndarray]:
    """40 uint8 images of 6x7 pixels, 4 classes of 10 samples each."""
    return make_images((40, 6, 7), "uint8"), np.repeat(np.arange(4), 10)


# -- badnets ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.3])
def test_badnets_digits_ground_truth(digits, fraction):
    x, y = digits
    x0, y0 = x.copy(), y.copy()
    p = badnets(x, y, target=3, fraction=fraction, seed=7)
    assert isinstance(p, PoisonedData)
    # inputs untouched, outputs are new arrays
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    assert not np.shares_memory(p.images, x) and not np.shares_memory(p.labels, y)
    # exact count, sorted unique int64 indices from the source classes (every class but the target)
    idx = p.indices
    assert len(idx) == round(fraction * len(y)) and idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)
    assert np.all(y[idx] != 3)
    # relabelled to the target, other labels unchanged
    assert np.all(p.labels[idx] == 3) and p.target == 3
    mask = np.zeros(len(y), dtype=bool)
    mask[idx] = True
    np.testing.assert_array_equal(p.mask, mask)
    np.testing.assert_array_equal(p.labels[~mask], y[~mask])
    # a 3x3 patch of the data's max (16.0) in the bottom-right corner, nothing else changed
    assert p.images.dtype == x.dtype and p.images.shape == x.shape
    assert np.all(p.images[idx, 5:, 5:] == 16.0)
    expected = x.copy()
    expected[idx, 5:, 5:] = 16.0
    np.testing.assert_array_equal(p.images, expected)
    assert "badnets" in p.description and f"{len(idx)} of 1797" in p.description


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "detected"])
def test_badnets_dtypes_and_layouts(dtype, layout, explicit):
    shape, channels_last = LAYOUTS[layout]
    x = make_images(shape, dtype)
    y = np.array([0, 1, 1, 2, 2])
    x0 = x.copy()
    p = badnets(x, y, target=0, fraction=0.4, patch_size=2, channels_last=channels_last if explicit else None)
    np.testing.assert_array_equal(x, x0)
    assert p.images.dtype == x.dtype and p.images.shape == x.shape
    value = 255 if dtype == "uint8" else x.max()
    expected = x.copy()
    canonical(expected, layout)[p.indices, 4:6, 5:7, :] = value
    np.testing.assert_array_equal(p.images, expected)
    assert len(p.indices) == 2 and np.all(p.labels[p.indices] == 0)


@pytest.mark.parametrize(
    ("position", "row", "col"),
    [
        ("top-left", 0, 0),
        ("top-right", 0, 4),
        ("bottom-left", 3, 0),
        ("bottom-right", 3, 4),
        ("center", 1, 2),
        ((2, 1), 2, 1),
    ],
)
def test_positions(position, row, col):
    x = np.zeros((3, 6, 7), dtype=np.uint8)
    out = apply_trigger(x, patch_size=3, position=position, value=9)
    expected = np.zeros_like(x)
    expected[:, row : row + 3, col : col + 3] = 9
    np.testing.assert_array_equal(out, expected)


def test_rectangular_patch_and_checkerboard():
    x = np.full((2, 5, 5), 100, dtype=np.uint8)
    out = apply_trigger(x, patch="checkerboard", patch_size=(2, 3), position="top-left")
    np.testing.assert_array_equal(out[:, :2, :3], np.broadcast_to([[255, 0, 255], [0, 255, 0]], (2, 2, 3)))
    assert np.all(out[:, 2:, :] == 100) and np.all(out[:, :, 3:] == 100)
    # floats: the data's max and min
    xf = np.linspace(-1.0, 2.0, 2 * 5 * 5, dtype=np.float32).reshape(2, 5, 5)
    outf = apply_trigger(xf, patch="checkerboard", patch_size=2, position=(0, 0))
    np.testing.assert_array_equal(outf[:, :2, :2], np.broadcast_to(np.float32([[2, -1], [-1, 2]]), (2, 2, 2)))


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_custom_patch_per_channel(layout):
    shape, channels_last = LAYOUTS[layout]
    x = make_images(shape, "uint8")
    rgb = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3) + 200  # [h, w, C]
    patch = rgb if layout == "HWC" else np.moveaxis(rgb, -1, 0)  # the image's own layout
    out = apply_trigger(x, patch=patch, position=(1, 2), channels_last=channels_last)
    expected = x.copy()
    canonical(expected, layout)[:, 1:3, 2:4, :] = rgb
    np.testing.assert_array_equal(out, expected)
    # a 2-D patch goes on every channel
    out2 = apply_trigger(x, patch=np.array([[7, 8]]), position="top-left", channels_last=channels_last)
    expected2 = x.copy()
    canonical(expected2, layout)[:, 0:1, 0:2, :] = np.array([[7, 8]])[..., None]
    np.testing.assert_array_equal(out2, expected2)


def test_trigger_callable_reuses_the_training_trigger(digits):
    x, y = digits
    train, test = x[:1000], x[1000:] / 2.0  # the test set's max (8.0) differs from the training max (16.0)
    p = badnets(train, y[:1000], target=1, fraction=0.1, patch="checkerboard", position="top-left")
    stamped = p.trigger(test)
    assert stamped.shape == test.shape and not np.shares_memory(stamped, test)
    np.testing.assert_array_equal(
        stamped[:, :3, :3], np.broadcast_to(p.images[p.indices[0], :3, :3], (len(test), 3, 3))
    )
    assert stamped[0, 0, 0] == 16.0
    np.testing.assert_array_equal(stamped[:, 3:, :], test[:, 3:, :])
    # uint8: the trigger equals apply_trigger with the same arguments
    xu = make_images((30, 6, 6, 3), "uint8")
    pu = badnets(xu, np.arange(30) % 3, target=2, fraction=0.2, patch_size=2, position="center")
    np.testing.assert_array_equal(pu.trigger(xu), apply_trigger(xu, patch_size=2, position="center"))


def test_determinism(small):
    x, y = small
    a = badnets(x, y, 1, 0.25, seed=3)
    b = badnets(x, y, 1, 0.25, seed=3)
    c = badnets(x, y, 1, 0.25, seed=4)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.indices, c.indices)
    # the same seed selects the same samples in every attack
    np.testing.assert_array_equal(blend(x, y, 1, 0.25, seed=3).indices, a.indices)
    np.testing.assert_array_equal(label_flip(y, 0.25, mode="targeted", target=1, seed=3).indices, a.indices)
    for attack in (lambda s: blend(x, y, 1, 0.25, seed=s), lambda s: label_flip(y, 0.25, seed=s)):
        r1, r2, r3 = attack(5), attack(5), attack(6)
        np.testing.assert_array_equal(r1.indices, r2.indices)
        np.testing.assert_array_equal(r1.labels, r2.labels)
        if r1.images is not None:
            np.testing.assert_array_equal(r1.images, r2.images)
        assert not np.array_equal(r1.indices, r3.indices)


def test_source_classes(small):
    x, y = small
    p = badnets(x, y, target=0, fraction=0.3, source_classes=[2, 3], seed=1)
    assert len(p.indices) == 12 and set(y[p.indices]) <= {2, 3}
    q = badnets(x, y, target=0, fraction=0.25, source_classes=1)  # all 10 samples of class 1
    np.testing.assert_array_equal(q.indices, np.flatnonzero(y == 1))
    # the target class as a source: stamped, label unchanged
    r = badnets(x, y, target=0, fraction=0.25, source_classes=[0])
    np.testing.assert_array_equal(r.labels, y)
    assert np.all(r.images[r.indices, 3:, 4:] == 255)


def test_fraction_zero_and_one(small):
    x, y = small
    for p in (badnets(x, y, 1, 0.0), blend(x, y, 1, 0.0), label_flip(y, 0.0)):
        assert p.indices.shape == (0,) and p.indices.dtype == np.int64
        np.testing.assert_array_equal(p.labels, y)
        if p.images is not None:
            np.testing.assert_array_equal(p.images, x)
            assert not np.shares_memory(p.images, x)
    # fraction 1 when the target class is absent (n_classes widens the label range): every sample is poisoned
    p = badnets(x, y, target=4, fraction=1.0, n_classes=5)
    np.testing.assert_array_equal(p.indices, np.arange(40))
    assert np.all(p.labels == 4)


def test_rounding_and_empty():
    y = np.repeat(np.arange(2), 5)
    x = np.zeros((10, 4, 4), dtype=np.float32)
    assert len(badnets(x, y, target=2, fraction=0.25, n_classes=3).indices) == round(0.25 * 10)  # 2 (half to even)
    assert len(badnets(x, y, target=2, fraction=0.35, n_classes=3).indices) == 4
    empty = badnets(np.zeros((0, 4, 4), np.uint8), np.zeros(0, np.int64), target=0, fraction=0.5, n_classes=2)
    assert empty.indices.shape == (0,) and empty.images.shape == (0, 4, 4)


def test_non_contiguous_input_and_int_label_dtypes(small):
    x, y = small
    xt = np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)  # a transposed (F-ordered) view
    y32 = y.astype(np.int32)
    p = badnets(xt, y32, target=2, fraction=0.2)
    assert p.labels.dtype == np.int32 and p.images.dtype == np.uint8
    np.testing.assert_array_equal(p.images, badnets(x, y, target=2, fraction=0.2).images)


def test_poisoned_data_is_frozen(small):
    x, y = small
    p = badnets(x, y, 1, 0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.target = 2  # type: ignore[misc]
    assert "indices=[4 poisoned]" in repr(p) and "shape=(40, 6, 7)" in repr(p)


# -- blend --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_blend_formula(dtype, small):
    x = small[0].astype(dtype) if dtype == "uint8" else (small[0] / 255.0).astype(dtype)
    y = small[1]
    pattern = make_images((6, 7), "float64", seed=9) * (255 if dtype == "uint8" else 1)
    x0 = x.copy()
    p = blend(x, y, target=2, fraction=0.3, pattern=pattern, alpha=0.2, seed=1)
    np.testing.assert_array_equal(x, x0)
    assert p.images.dtype == x.dtype and len(p.indices) == 12 and np.all(p.labels[p.indices] == 2)
    mixed = 0.8 * x[p.indices].astype(np.float64) + 0.2 * pattern
    want = np.clip(np.rint(mixed), 0, 255).astype(dtype) if dtype == "uint8" else mixed.astype(dtype)
    np.testing.assert_array_equal(p.images[p.indices], want)
    rest = np.setdiff1d(np.arange(40), p.indices)
    np.testing.assert_array_equal(p.images[rest], x[rest])
    np.testing.assert_array_equal(p.trigger(x), apply_blend(x, pattern, alpha=0.2))
    assert "blend" in p.description and "alpha 0.2" in p.description


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_blend_noise_and_layouts(layout):
    shape, channels_last = LAYOUTS[layout]
    x = make_images(shape, "uint8")
    y = np.array([0, 0, 1, 1, 1])
    p = blend(x, y, target=0, fraction=0.6, alpha=1.0, channels_last=channels_last, seed=2)
    noise = p.images[p.indices]  # alpha 1: the poisoned images are the pattern itself
    np.testing.assert_array_equal(noise, np.broadcast_to(noise[0], noise.shape))
    assert noise.min() < 50 and noise.max() > 200  # uniform over 0..255
    if layout != "HW":  # independent noise per channel
        c = canonical(noise, layout)
        assert not np.array_equal(c[..., 0], c[..., 1])
    # integer images: apply_blend with the same seed draws the same noise
    np.testing.assert_array_equal(apply_blend(x, alpha=1.0, channels_last=channels_last, seed=2)[0], noise[0])
    # a 2-D pattern goes on every channel; alpha 0 changes no pixel (labels still flip)
    q = blend(x, y, 0, 0.6, pattern=np.full((6, 7), 10.0), alpha=0.5, channels_last=channels_last)
    want = np.rint(0.5 * x[q.indices].astype(np.float64) + 5.0).astype(np.uint8)
    np.testing.assert_array_equal(q.images[q.indices], want)
    z = blend(x, y, 0, 0.6, alpha=0.0, channels_last=channels_last)
    np.testing.assert_array_equal(z.images, x)
    assert np.all(z.labels[z.indices] == 0)


def test_blend_float_noise_spans_the_data_range(digits):
    x, y = digits
    p = blend(x, y, target=5, fraction=0.1, alpha=1.0)
    noise = p.images[p.indices[0]]
    assert noise.min() >= 0.0 and noise.max() <= 16.0 and noise.std() > 3.0
    test = x[:10] * 0.5
    np.testing.assert_allclose(p.trigger(test), np.broadcast_to(noise, test.shape))


# -- label flipping -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8"])
def test_label_flip_random_never_keeps_a_label(digits, dtype):
    y = digits[1].astype(dtype)
    y0 = y.copy()
    p = label_flip(y, 1.0, seed=3)
    np.testing.assert_array_equal(y, y0)
    assert p.images is None and p.target is None and p.trigger is None
    assert p.labels.dtype == y.dtype and len(p.indices) == len(y)
    assert np.all(p.labels != y)
    assert p.labels.min() >= 0 and p.labels.max() <= 9
    # new labels are spread over the other classes
    counts = np.bincount(p.labels[y == 0], minlength=10)
    assert counts[0] == 0 and np.all(counts[1:] > 0)
    q = label_flip(y, 0.2, seed=3)
    assert len(q.indices) == round(0.2 * len(y))
    changed = np.flatnonzero(q.labels != y)
    np.testing.assert_array_equal(changed, q.indices)


def test_label_flip_two_classes_swaps():
    y = np.array([0, 1, 0, 1, 1, 0])
    p = label_flip(y, 1.0)
    np.testing.assert_array_equal(p.labels, 1 - y)
    # n_classes widens the choice to classes that do not occur
    q = label_flip(np.zeros(50, dtype=np.int64), 1.0, n_classes=3)
    assert set(q.labels.tolist()) == {1, 2}


def test_label_flip_targeted(small):
    y = small[1]
    p = label_flip(y, 0.5, mode="targeted", target=3, seed=2)
    assert p.target == 3 and len(p.indices) == 20
    assert np.all(y[p.indices] != 3) and np.all(p.labels[p.indices] == 3)
    np.testing.assert_array_equal(np.flatnonzero(p.labels != y), p.indices)
    q = label_flip(y, 0.25, mode="targeted", target=3, source_classes=[1])
    np.testing.assert_array_equal(q.indices, np.flatnonzero(y == 1))


# -- validation ---------------------------------------------------------------------------------------------------

X = make_images((10, 5, 5), "uint8")
Y = np.repeat(np.arange(5), 2)

VALUE_ERRORS = [
    ("fraction<0", lambda: badnets(X, Y, 0, -0.1), r"fraction must be in \[0, 1\], got -0\.1"),
    ("fraction>1", lambda: blend(X, Y, 0, 1.5), r"fraction must be in \[0, 1\], got 1\.5"),
    ("fraction nan", lambda: label_flip(Y, float("nan")), r"fraction must be in \[0, 1\], got nan"),
    ("target high", lambda: badnets(X, Y, 5, 0.1), r"target 5 is outside the label range \[0, 5\)"),
    ("target negative", lambda: blend(X, Y, -1, 0.1), r"target -1 is outside the label range"),
    ("target flip", lambda: label_flip(Y, 0.1, mode="targeted", target=7), r"target 7 is outside"),
    ("too few sources", lambda: badnets(X, Y, 0, 0.9), r"fraction 0\.9 asks for 9 of 10 samples .* only 8 samples"),
    ("too few flips", lambda: label_flip(Y, 0.5, source_classes=[1, 2]), r"asks for 5 of 10 .* only 4"),
    ("patch too large", lambda: badnets(X, Y, 0, 0.1, patch_size=6), r"patch of 6x6 pixels is larger than the 5x5"),
    ("patch rect too large", lambda: apply_trigger(X, patch_size=(2, 7)), r"2x7 pixels is larger than the 5x5"),
    ("array too large", lambda: apply_trigger(X, patch=np.zeros((6, 1))), r"6x1 pixels is larger"),
    ("patch_size 0", lambda: apply_trigger(X, patch_size=0), r"patch_size must be >= 1, got 0"),
    ("position outside", lambda: apply_trigger(X, position=(3, 0)), r"position \(3, 0\) puts the 3x3 patch outside"),
    ("position negative", lambda: apply_trigger(X, position=(-1, 0)), r"position \(-1, 0\)"),
    ("position name", lambda: apply_trigger(X, position="middle"), r"position must be one of .* got 'middle'"),
    ("patch kind", lambda: apply_trigger(X, patch="circle"), r"patch must be one of .* got 'circle'"),
    ("value range", lambda: apply_trigger(X, value=300), r"value must be within \[0, 255\] for uint8"),
    ("value fractional", lambda: apply_trigger(X, value=1.5), r"value must be integral for uint8 images, got 1\.5"),
    ("patch range", lambda: apply_trigger(X, patch=np.full((2, 2), -1)), r"patch must be within \[0, 255\]"),
    ("lengths", lambda: badnets(X, Y[:9], 0, 0.1), r"labels has 9 entries but images has 10 samples"),
    ("lengths blend", lambda: blend(X[:3], Y, 0, 0.1), r"labels has 10 entries but images has 3 samples"),
    ("images 2-D", lambda: badnets(X.reshape(10, 25), Y, 0, 0.1), r"got ndim 2 with shape \(10, 25\)"),
    ("images 5-D", lambda: apply_trigger(X[..., None, None]), r"got ndim 5"),
    ("labels 2-D", lambda: badnets(X, Y[:, None], 0, 0.1), r"labels must be 1-D \[N\], got shape \(10, 1\)"),
    ("labels negative", lambda: label_flip(Y - 1, 0.1), r"labels must be >= 0, got minimum -1"),
    ("ambiguous", lambda: apply_trigger(np.zeros((2, 3, 5, 3))), r"cannot tell the channel axis .* \(2, 3, 5, 3\)"),
    ("neither", lambda: apply_trigger(np.zeros((2, 8, 8, 8))), r"cannot tell the channel axis"),
    ("channels 3-D", lambda: apply_trigger(X, channels_last=True), r"channels_last applies to 4-D images only"),
    ("patch channels", lambda: apply_trigger(np.zeros((2, 5, 5, 3)), patch=np.ones((2, 2, 4))), r"4\) .* 3 channels"),
    ("patch ndim", lambda: apply_trigger(X, patch=np.ones((2, 2, 1))), r"patch must be \[h, w\] .* shape \(2, 2, 1\)"),
    ("n_classes small", lambda: badnets(X, Y, 0, 0.1, n_classes=3), r"n_classes 3 is too small for labels up to 4"),
    ("one class", lambda: label_flip(np.zeros(4, np.int64), 0.5), r"at least 2 classes, got n_classes 1"),
    ("mode", lambda: label_flip(Y, 0.1, mode="nearest"), r"mode must be one of .* got 'nearest'"),
    ("target missing", lambda: label_flip(Y, 0.1, mode="targeted"), r"needs a target class"),
    ("target unused", lambda: label_flip(Y, 0.1, target=1), r"target is only used with mode='targeted'"),
    ("target source", lambda: label_flip(Y, 0.1, mode="targeted", target=1, source_classes=[1, 2]), r"include the"),
    ("alpha", lambda: blend(X, Y, 0, 0.1, alpha=1.5), r"alpha must be in \[0, 1\], got 1\.5"),
    ("pattern shape", lambda: blend(X, Y, 0, 0.1, pattern=np.ones((4, 5))), r"4x5 pixels, expected the image size 5x5"),
    ("pattern name", lambda: apply_blend(X, "stripes"), r"pattern must be 'noise' or an array, got 'stripes'"),
    ("pattern nan", lambda: apply_blend(X, np.full((5, 5), np.nan)), r"pattern must be finite"),
    ("sources range", lambda: badnets(X, Y, 0, 0.1, source_classes=[1, 9]), r"source_classes \[9\] are outside"),
    ("seed", lambda: badnets(X, Y, 0, 0.1, seed=-1), r"seed must be >= 0, got -1"),
    ("label dtype range", lambda: label_flip(Y.astype(np.uint8), 0.1, n_classes=300), r"does not fit .* uint8"),
]

TYPE_ERRORS = [
    (
        "float labels",
        lambda: badnets(X, Y.astype(np.float64), 0, 0.1),
        r"labels must have an integer dtype, got float64",
    ),
    ("bool labels", lambda: label_flip(Y > 2, 0.1), r"labels must have an integer dtype, got bool"),
    ("float target", lambda: badnets(X, Y, 1.5, 0.1), r"target must be an integer, got float 1\.5"),
    ("bool target", lambda: badnets(X, Y, True, 0.1), r"target must be an integer, got bool"),
    ("str fraction", lambda: badnets(X, Y, 0, "0.1"), r"fraction must be a real number .* got str '0\.1'"),
    (
        "object images",
        lambda: apply_trigger(np.zeros((2, 3, 3), dtype=object)),
        r"integer or floating dtype, got object",
    ),
    ("bool images", lambda: apply_trigger(np.zeros((2, 3, 3), dtype=bool)), r"got bool"),
    ("float sources", lambda: badnets(X, Y, 0, 0.1, source_classes=[1.0]), r"source_classes must be integers"),
    ("float seed", lambda: blend(X, Y, 0, 0.1, seed=0.5), r"seed must be an integer, got float"),
    ("value str", lambda: apply_trigger(X, value="max"), r"value must be a real number, got str"),
    ("channels_last str", lambda: apply_trigger(X, channels_last="yes"), r"channels_last must be a bool or None"),
]


@pytest.mark.parametrize(("make", "match"), [c[1:] for c in VALUE_ERRORS], ids=[c[0] for c in VALUE_ERRORS])
def test_value_errors(make, match):
    x0, y0 = X.copy(), Y.copy()
    with pytest.raises(ValueError, match=match):
        make()
    np.testing.assert_array_equal(X, x0)
    np.testing.assert_array_equal(Y, y0)


@pytest.mark.parametrize(("make", "match"), [c[1:] for c in TYPE_ERRORS], ids=[c[0] for c in TYPE_ERRORS])
def test_type_errors(make, match):
    with pytest.raises(TypeError, match=match):
        make()
