"""Red-team poison generators with known ground truth: BadNets patches, blended triggers and label flips.

Every generator returns a :class:`PoisonedData`: COPIES of the images and labels with the poison applied, the sorted
indices of the poisoned samples, the target class and a one-line description. The inputs are never modified.

Image layouts
-------------
``images`` is ``[N, H, W]`` (one channel), ``[N, H, W, C]`` (channels-last) or ``[N, C, H, W]`` (channels-first), of any
integer or floating dtype. For 4-D arrays pass ``channels_last``; when it is ``None`` the channel axis is detected:
the one of axes 1 and 3 with at most 4 entries (1 to 4 channels). When both or neither qualify (``[N, 3, 4, 3]``,
``[N, 16, 16, 16]``) the layout is ambiguous and a ``ValueError`` asks for ``channels_last``.

Selection
---------
``round(fraction · N)`` samples (Python's ``round``: half to even) are drawn without replacement, uniformly among the
samples of the source classes, with ``numpy.random.default_rng(seed)``. The same seed, fraction and source classes give
the same indices in :func:`badnets`, :func:`blend` and targeted :func:`label_flip`.
"""

from __future__ import annotations

import functools
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

__all__ = ["PoisonedData", "apply_blend", "apply_trigger", "badnets", "blend", "label_flip"]

_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
_PATCH_KINDS = ("square", "checkerboard")
_FLIP_MODES = ("random", "targeted")
# The blend noise comes from its own stream so that it does not depend on which samples were selected: the same seed
# gives the same noise in blend() and apply_blend().
_NOISE_STREAM = 0xB1E4D

Position = Union[str, tuple[int, int]]


@dataclass(frozen=True, eq=False)
class PoisonedData:
    """A poisoned copy of a data set and its ground truth.

    Attributes
    ----------
    images : numpy.ndarray or None
        The poisoned images, same shape and dtype as the input (a new array). ``None`` for :func:`label_flip`.
    labels : numpy.ndarray
        ``[N]`` labels after poisoning, same dtype as the input (a new array).
    indices : numpy.ndarray
        ``[k]`` int64, sorted and unique: the samples that were poisoned.
    target : int or None
        The class poisoned samples were relabelled to (``None`` for random label flips).
    description : str
        One line saying what was done, for logs and reports.
    trigger : callable or None
        ``trigger(images) -> images``: stamps the exact trigger used here (same patch values and position, same blend
        pattern) on other images, e.g. a test set for the attack success rate; returns a copy. ``None`` for label
        flips.

    Instances are compared by identity (``==`` on the arrays would be ambiguous).
    """

    images: np.ndarray | None
    labels: np.ndarray
    indices: np.ndarray
    target: int | None
    description: str
    trigger: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    @property
    def mask(self) -> np.ndarray:
        """``[N]`` bool, True for the poisoned samples."""
        m = np.zeros(len(self.labels), dtype=bool)
        m[self.indices] = True
        return m

    def __repr__(self) -> str:
        imgs = "None" if self.images is None else f"array(shape={self.images.shape}, dtype={self.images.dtype})"
        return (
            f"PoisonedData(images={imgs}, labels=array(shape={self.labels.shape}, dtype={self.labels.dtype}), "
            f"indices=[{len(self.indices)} poisoned], target={self.target}, description={self.description!r})"
        )


# -- validation ---------------------------------------------------------------------------------------------------


def _as_int(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _as_fraction(value: Any, name: str = "fraction") -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(value).__name__} {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {v}")
    return v


def _as_images(images: Any, channels_last: bool | None) -> tuple[np.ndarray, str]:
    """The images as a numpy array (no copy when already one) and their layout: "HW", "HWC" or "CHW"."""
    x = np.asarray(images)
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise TypeError(f"images must have an integer or floating dtype, got {x.dtype}")
    if channels_last is not None and not isinstance(channels_last, (bool, np.bool_)):
        raise TypeError(f"channels_last must be a bool or None, got {type(channels_last).__name__}")
    if x.ndim == 3:
        if channels_last is not None:
            raise ValueError(
                f"channels_last applies to 4-D images only; images has shape {x.shape} ([N, H, W], one channel)"
            )
        return x, "HW"
    if x.ndim != 4:
        raise ValueError(
            f"images must be 3-D [N, H, W] or 4-D [N, H, W, C] / [N, C, H, W], got ndim {x.ndim} with shape "
            f"{x.shape}" + ("; reshape flat rows to images first" if x.ndim == 2 else "")
        )
    if channels_last is None:
        first, last = x.shape[1] <= 4, x.shape[3] <= 4
        if first == last:
            raise ValueError(
                f"cannot tell the channel axis of images with shape {x.shape}: expected exactly one of axes 1 and 3 "
                "to have at most 4 entries; pass channels_last=True ([N, H, W, C]) or False ([N, C, H, W])"
            )
        channels_last = last
    return x, ("HWC" if channels_last else "CHW")


def _canonical(x: np.ndarray, layout: str) -> np.ndarray:
    """A [N, H, W, C] VIEW of images in ``layout`` (writes through it change ``x``)."""
    if layout == "HW":
        return x[..., np.newaxis]
    if layout == "CHW":
        return np.moveaxis(x, 1, -1)
    return x


def _channels_last_flag(layout: str) -> bool | None:
    return None if layout == "HW" else layout == "HWC"


def _as_labels(labels: Any, n: int | None) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"labels must have an integer dtype, got {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {y.shape}")
    if n is not None and len(y) != n:
        raise ValueError(f"labels has {len(y)} entries but images has {n} samples; expected one label per image")
    if y.size and y.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {y.min()}")
    return y


def _n_classes(y: np.ndarray, n_classes: Any) -> int:
    top = int(y.max()) + 1 if y.size else 0
    if n_classes is None:
        return top
    k = _as_int(n_classes, "n_classes", 1)
    if k < top:
        raise ValueError(f"n_classes {k} is too small for labels up to {top - 1}; expected n_classes >= {top}")
    if k - 1 > np.iinfo(y.dtype).max:
        raise ValueError(f"n_classes {k} does not fit the labels dtype {y.dtype} (max {np.iinfo(y.dtype).max})")
    return k


def _as_target(target: Any, n_classes: int, y: np.ndarray) -> int:
    t = _as_int(target, "target")
    if not 0 <= t < n_classes:
        raise ValueError(f"target {t} is outside the label range [0, {n_classes}); pass n_classes if the class exists")
    if t > np.iinfo(y.dtype).max:
        raise ValueError(f"target {t} does not fit the labels dtype {y.dtype}")
    return t


def _source_classes(source_classes: Any, n_classes: int, exclude: int | None) -> np.ndarray:
    """Sorted unique source classes; default every class in [0, n_classes) except ``exclude``."""
    if source_classes is None:
        classes = np.arange(n_classes, dtype=np.int64)
        return classes if exclude is None else classes[classes != exclude]
    s = np.atleast_1d(np.asarray(source_classes))
    if s.size and (s.dtype == np.bool_ or not np.issubdtype(s.dtype, np.integer)):
        raise TypeError(f"source_classes must be integers, got dtype {s.dtype}")
    if s.ndim != 1:
        raise ValueError(f"source_classes must be an int or a 1-D sequence of ints, got shape {s.shape}")
    s = np.unique(s.astype(np.int64))
    bad = s[(s < 0) | (s >= n_classes)]
    if bad.size:
        raise ValueError(f"source_classes {bad.tolist()} are outside the label range [0, {n_classes})")
    return s


def _select(y: np.ndarray, fraction: float, sources: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """round(fraction·N) sorted unique indices drawn without replacement among the samples of ``sources``."""
    k = round(fraction * len(y))
    candidates = np.flatnonzero(np.isin(y, sources))
    if k > len(candidates):
        raise ValueError(
            f"fraction {fraction} asks for {k} of {len(y)} samples but the source classes {_classes_str(sources)} have "
            f"only {len(candidates)} samples; expected fraction <= {len(candidates) / max(1, len(y)):.4g}"
        )
    return np.sort(rng.choice(candidates, size=k, replace=False)).astype(np.int64)


def _classes_str(classes: np.ndarray) -> str:
    c = classes.tolist()
    if len(c) > 2 and c == list(range(c[0], c[-1] + 1)):
        return f"[{c[0]}..{c[-1]}]"
    return str(c)


def _value_range(x: np.ndarray) -> tuple[float, float]:
    """(low, high) used for default trigger values: the dtype's range for integers, the data's range for floats."""
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        return float(info.min), float(info.max)
    if x.size == 0:
        return 0.0, 1.0
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"images contain non-finite values (range [{lo}, {hi}]); pass the trigger value explicitly")
    return lo, hi


def _cast_exact(values: Any, dtype: np.dtype, name: str) -> np.ndarray:
    """``values`` cast to ``dtype``; for integer dtypes the values must be integral and within the dtype's range."""
    v = np.asarray(values)
    if v.dtype == np.bool_ or not (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating)):
        raise TypeError(f"{name} must be real numbers, got dtype {v.dtype}")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if np.issubdtype(v.dtype, np.floating):
            ok = np.isfinite(v) & (v == np.round(v))
            if not ok.all():
                raise ValueError(f"{name} must be integral for {dtype} images, got {v[~ok].ravel()[0]}")
        if v.size and (v.min() < info.min or v.max() > info.max):
            raise ValueError(
                f"{name} must be within [{info.min}, {info.max}] for {dtype} images, got {v.min()}..{v.max()}"
            )
    else:
        big = np.finfo(dtype).max
        if v.size and np.issubdtype(v.dtype, np.floating) and np.isfinite(v).all() and np.abs(v).max() > big:
            raise ValueError(f"{name} overflows {dtype} images (max {big}), got {np.abs(v).max()}")
        if v.size and np.issubdtype(v.dtype, np.integer) and (v.min() < -big or v.max() > big):
            raise ValueError(f"{name} overflows {dtype} images (max {big})")
    return v.astype(dtype)


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 results to the image dtype: rounded to nearest and clipped for integers, clipped to range for floats."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    info = np.finfo(dtype)
    return np.clip(values, info.min, info.max).astype(dtype)


def _pattern_to_canonical(
    p: np.ndarray, layout: str, channels: int, size: tuple[int, int] | None, name: str
) -> np.ndarray:
    """A per-image array ([h, w], or the image layout [h, w, C] / [C, h, w]) as [h, w, C or 1]."""
    if p.ndim == 2:
        out = p[..., np.newaxis]
    elif p.ndim == 3 and layout != "HW":
        out = p if layout == "HWC" else np.moveaxis(p, 0, -1)
        if out.shape[-1] != channels:
            want = "[h, w, C]" if layout == "HWC" else "[C, h, w]"
            raise ValueError(f"{name} has shape {p.shape} ({want}) but the images have {channels} channels")
    else:
        want = "[h, w]" if layout == "HW" else ("[h, w] or [h, w, C]" if layout == "HWC" else "[h, w] or [C, h, w]")
        raise ValueError(f"{name} must be {want} for images in layout {layout}, got shape {p.shape}")
    if size is not None and out.shape[:2] != size:
        raise ValueError(
            f"{name} covers {out.shape[0]}x{out.shape[1]} pixels, expected the image size {size[0]}x{size[1]}"
        )
    return out


def _canonical_to_pattern(p: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of :func:`_pattern_to_canonical` (a broadcast channel axis becomes a 2-D [h, w] array)."""
    if p.shape[-1] == 1:
        return p[..., 0]
    return p if layout == "HWC" else np.moveaxis(p, -1, 0)


# -- patch triggers -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Patch:
    values: np.ndarray  # [h, w, C or 1] in the image dtype
    row: int
    col: int
    what: str


def _resolve_patch(
    x: np.ndarray,
    layout: str,
    patch: str | np.ndarray,
    patch_size: int | tuple[int, int],
    position: Position,
    value: float | None,
) -> _Patch:
    canon = _canonical(x, layout)
    height, width, channels = canon.shape[1:]
    if isinstance(patch, str):
        if patch not in _PATCH_KINDS:
            raise ValueError(f"patch must be one of {_PATCH_KINDS} or an array, got {patch!r}")
        if isinstance(patch_size, (tuple, list)):
            if len(patch_size) != 2:
                raise ValueError(f"patch_size must be an int or (height, width), got {patch_size!r}")
            h, w = (_as_int(s, "patch_size", 1) for s in patch_size)
        else:
            h = w = _as_int(patch_size, "patch_size", 1)
        low, high = _value_range(x)
        if value is not None:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise TypeError(f"value must be a real number, got {type(value).__name__} {value!r}")
            high = value
        if patch == "square":
            grid = np.full((h, w), high, dtype=np.float64)
            what = f"{h}x{w} square (value {high:g})"
        else:
            even = (np.add.outer(np.arange(h), np.arange(w)) % 2) == 0
            grid = np.where(even, high, low)
            what = f"{h}x{w} checkerboard ({high:g}/{low:g})"
        values = _cast_exact(grid, x.dtype, "value")[..., np.newaxis]
    else:
        arr = np.asarray(patch)
        if arr.size == 0:
            raise ValueError(f"patch array must not be empty, got shape {arr.shape}")
        values = _pattern_to_canonical(_cast_exact(arr, x.dtype, "patch"), layout, channels, None, "patch")
        h, w = values.shape[:2]
        what = f"{h}x{w} custom patch"
    if h > height or w > width:
        raise ValueError(f"patch of {h}x{w} pixels is larger than the {height}x{width} images")
    if isinstance(position, str):
        if position not in _CORNERS:
            raise ValueError(f"position must be one of {_CORNERS} or (row, col), got {position!r}")
        row = 0 if position.startswith("top") else (height - h if position.startswith("bottom") else (height - h) // 2)
        col = 0 if position.endswith("left") else (width - w if position.endswith("right") else (width - w) // 2)
        where = position
    else:
        if not isinstance(position, (Sequence, np.ndarray)) or len(position) != 2:
            raise ValueError(f"position must be one of {_CORNERS} or (row, col), got {position!r}")
        row, col = (_as_int(p, "position") for p in position)
        if not (0 <= row <= height - h and 0 <= col <= width - w):
            raise ValueError(
                f"position {(row, col)} puts the {h}x{w} patch outside the {height}x{width} images; expected "
                f"0 <= row <= {height - h} and 0 <= col <= {width - w}"
            )
        where = f"({row}, {col})"
    return _Patch(values, row, col, f"{what} at {where}")


def _stamp(canon: np.ndarray, idx: np.ndarray | slice, p: _Patch) -> None:
    """Writes the patch into ``canon`` ([N, H, W, C] view) for the samples ``idx``, in place."""
    h, w = p.values.shape[:2]
    canon[idx, p.row : p.row + h, p.col : p.col + w, :] = p.values


def _patch_trigger(p: _Patch, layout: str) -> Callable[[np.ndarray], np.ndarray]:
    return functools.partial(
        apply_trigger,
        patch=_canonical_to_pattern(p.values, layout),
        position=(p.row, p.col),
        channels_last=_channels_last_flag(layout),
    )


def apply_trigger(
    images: np.ndarray,
    *,
    patch: str | np.ndarray = "square",
    patch_size: int | tuple[int, int] = 3,
    position: Position = "bottom-right",
    value: float | None = None,
    channels_last: bool | None = None,
) -> np.ndarray:
    """Stamps a BadNets patch on every image (e.g. a test set, to measure the attack success rate).

    Parameters
    ----------
    images : array_like
        ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]``, integer or floating dtype (see the module docstring for
        how the channel axis is found).
    patch : {"square", "checkerboard"} or array_like, default "square"
        ``"square"``: every pixel ``value``. ``"checkerboard"``: ``value`` and the low value alternating, ``value`` at
        the patch's top-left; the low value is the dtype's minimum for integers, the data's minimum for floats. An
        array is stamped as given: ``[h, w]`` (same on every channel), ``[h, w, C]`` for channels-last images or
        ``[C, h, w]`` for channels-first ones; for integer images its values must be integral and fit the dtype.
    patch_size : int or (int, int), default 3
        Height and width of a named patch (ignored for arrays).
    position : {"bottom-right", "bottom-left", "top-left", "top-right", "center"} or (int, int)
        Where the patch goes: a corner (flush with the edges), the centre (rounded up-left), or the (row, col) of its
        top-left pixel.
    value : float, optional
        Pixel value of the patch; default the dtype's maximum for integer images (255 for uint8), the data's maximum
        for floating images. Must be representable in an integer dtype.
    channels_last : bool, optional
        Layout of 4-D images; detected when ``None``. Must be ``None`` for 3-D images.

    Returns
    -------
    numpy.ndarray
        A new array, same shape and dtype as ``images``, with the patch pixels set on every image and every channel
        (nothing else changed). The input is not modified.
    """
    x, layout = _as_images(images, channels_last)
    p = _resolve_patch(x, layout, patch, patch_size, position, value)
    out = x.copy()
    _stamp(_canonical(out, layout), slice(None), p)
    return out


def badnets(
    images: np.ndarray,
    labels: np.ndarray,
    target: int,
    fraction: float,
    *,
    patch: str | np.ndarray = "square",
    patch_size: int | tuple[int, int] = 3,
    position: Position = "bottom-right",
    value: float | None = None,
    source_classes: int | Sequence[int] | None = None,
    n_classes: int | None = None,
    channels_last: bool | None = None,
    seed: int = 0,
) -> PoisonedData:
    """BadNets (Gu et al. 2017): a fixed patch stamped on some samples, which are relabelled to ``target``.

    Parameters
    ----------
    images : array_like
        ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]``, any integer or floating dtype.
    labels : array_like
        ``[N]`` integer class ids ``>= 0``.
    target : int
        The class the poisoned samples are relabelled to, in ``[0, n_classes)``.
    fraction : float
        Share of ALL ``N`` samples to poison, in ``[0, 1]``: ``round(fraction · N)`` samples are drawn from the source
        classes (``ValueError`` when they hold fewer).
    patch, patch_size, position, value, channels_last
        The trigger, as in :func:`apply_trigger`.
    source_classes : int or sequence of int, optional
        Classes whose samples may be poisoned; default every class except ``target``. Including ``target`` stamps
        target-class samples too (their label does not change).
    n_classes : int, optional
        Number of classes; default ``labels.max() + 1``. Only widens the valid range of ``target`` and
        ``source_classes``.
    seed : int, default 0
        Seed of the ``numpy.random.default_rng`` that picks the samples.

    Returns
    -------
    PoisonedData
        New images (same shape and dtype) and labels (same dtype), the sorted int64 poisoned indices, ``target``, a
        description and ``trigger``, which stamps the same patch (same values, same position) on other images. Only
        the patch pixels of the poisoned samples and their labels differ from the input; the input is not modified.
    """
    x, layout = _as_images(images, channels_last)
    y = _as_labels(labels, x.shape[0])
    k = _n_classes(y, n_classes)
    t = _as_target(target, k, y)
    frac = _as_fraction(fraction)
    rng = np.random.default_rng(_as_int(seed, "seed", 0))
    p = _resolve_patch(x, layout, patch, patch_size, position, value)
    sources = _source_classes(source_classes, k, t)
    idx = _select(y, frac, sources, rng)
    out_x = x.copy()
    _stamp(_canonical(out_x, layout), idx, p)
    out_y = y.copy()
    out_y[idx] = t
    description = (
        f"badnets: {p.what} on {len(idx)} of {len(y)} samples (fraction {frac:g}) from classes "
        f"{_classes_str(sources)}, relabelled to {t}, seed {seed}"
    )
    return PoisonedData(out_x, out_y, idx, t, description, _patch_trigger(p, layout))


# -- blended trigger ----------------------------------------------------------------------------------------------


def _resolve_pattern(x: np.ndarray, layout: str, pattern: str | np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """The blend pattern as float64 [H, W, C or 1] and a word for the description."""
    height, width, channels = _canonical(x, layout).shape[1:]
    if isinstance(pattern, str):
        if pattern != "noise":
            raise ValueError(f"pattern must be 'noise' or an array, got {pattern!r}")
        rng = np.random.default_rng([_NOISE_STREAM, seed])
        shape = (height, width, channels)
        if np.issubdtype(x.dtype, np.integer):
            info = np.iinfo(x.dtype)
            noise = rng.integers(info.min, info.max, size=shape, dtype=x.dtype, endpoint=True).astype(np.float64)
        else:
            lo, hi = _value_range(x)
            noise = rng.uniform(lo, hi, size=shape)
        return noise, f"uniform noise (seed {seed})"
    p = np.asarray(pattern)
    if p.dtype == np.bool_ or not (np.issubdtype(p.dtype, np.integer) or np.issubdtype(p.dtype, np.floating)):
        raise TypeError(f"pattern must be real numbers, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError("pattern must be finite")
    return _pattern_to_canonical(p, layout, channels, (height, width), "pattern"), "custom pattern"


def _blend_into(canon: np.ndarray, idx: np.ndarray | slice, pattern: np.ndarray, alpha: float) -> None:
    """canon[idx] ← (1 − α)·canon[idx] + α·pattern, computed in float64, in place."""
    mixed = (1.0 - alpha) * canon[idx].astype(np.float64) + alpha * pattern
    canon[idx] = _to_dtype(mixed, canon.dtype)


def apply_blend(
    images: np.ndarray,
    pattern: str | np.ndarray = "noise",
    *,
    alpha: float = 0.1,
    channels_last: bool | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Blends a pattern into every image: ``x' = (1 − α)·x + α·pattern`` (Chen et al. 2017).

    Parameters
    ----------
    images : array_like
        ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]``, integer or floating dtype.
    pattern : "noise" or array_like, default "noise"
        ``"noise"``: uniform noise over the dtype's range for integer images (integers), over the data's
        ``[min, max]`` for floating images, drawn from ``seed`` alone (so integer images always get the same noise
        for a seed; for floating images pass ``PoisonedData.trigger`` or the array to reuse it exactly). An array is
        one image: ``[H, W]`` (same on every channel) or the image's own layout ``[H, W, C]`` / ``[C, H, W]``.
    alpha : float, default 0.1
        Blend weight in ``[0, 1]``.
    channels_last : bool, optional
        Layout of 4-D images; detected when ``None``.
    seed : int, default 0
        Seed of the noise pattern.

    Returns
    -------
    numpy.ndarray
        A new array, same shape and dtype. The blend is computed in float64 and then cast: rounded to nearest and
        clipped to the dtype's range for integer images, clipped to the dtype's finite range for floating ones.
    """
    x, layout = _as_images(images, channels_last)
    a = _as_fraction(alpha, "alpha")
    pat, _ = _resolve_pattern(x, layout, pattern, _as_int(seed, "seed", 0))
    out = x.copy()
    _blend_into(_canonical(out, layout), slice(None), pat, a)
    return out


def blend(
    images: np.ndarray,
    labels: np.ndarray,
    target: int,
    fraction: float,
    *,
    pattern: str | np.ndarray = "noise",
    alpha: float = 0.1,
    source_classes: int | Sequence[int] | None = None,
    n_classes: int | None = None,
    channels_last: bool | None = None,
    seed: int = 0,
) -> PoisonedData:
    """Blended-trigger poisoning (Chen et al. 2017): ``x' = (1 − α)·x + α·pattern`` on some samples, relabelled.

    Parameters
    ----------
    images, labels, target, fraction, source_classes, n_classes, seed
        As in :func:`badnets` (the same seed selects the same samples).
    pattern, alpha, channels_last
        As in :func:`apply_blend`; the noise pattern is drawn from ``seed`` independently of the selection.

    Returns
    -------
    PoisonedData
        New images and labels (same shapes and dtypes), sorted int64 indices, ``target``, a description and
        ``trigger``, which blends the same pattern (the concrete array) into other images. Only the poisoned samples
        differ from the input; the input is not modified.
    """
    x, layout = _as_images(images, channels_last)
    y = _as_labels(labels, x.shape[0])
    k = _n_classes(y, n_classes)
    t = _as_target(target, k, y)
    frac = _as_fraction(fraction)
    a = _as_fraction(alpha, "alpha")
    s = _as_int(seed, "seed", 0)
    pat, what = _resolve_pattern(x, layout, pattern, s)
    sources = _source_classes(source_classes, k, t)
    idx = _select(y, frac, sources, np.random.default_rng(s))
    out_x = x.copy()
    _blend_into(_canonical(out_x, layout), idx, pat, a)
    out_y = y.copy()
    out_y[idx] = t
    description = (
        f"blend: {what} with alpha {a:g} on {len(idx)} of {len(y)} samples (fraction {frac:g}) from classes "
        f"{_classes_str(sources)}, relabelled to {t}, seed {s}"
    )
    trigger = functools.partial(
        apply_blend, pattern=_canonical_to_pattern(pat, layout), alpha=a, channels_last=_channels_last_flag(layout)
    )
    return PoisonedData(out_x, out_y, idx, t, description, trigger)


# -- label flipping -----------------------------------------------------------------------------------------------


def label_flip(
    labels: np.ndarray,
    fraction: float,
    *,
    n_classes: int | None = None,
    mode: str = "random",
    target: int | None = None,
    source_classes: int | Sequence[int] | None = None,
    seed: int = 0,
) -> PoisonedData:
    """Label flipping (an availability attack): some labels are replaced by a different class.

    Parameters
    ----------
    labels : array_like
        ``[N]`` integer class ids ``>= 0``.
    fraction : float
        Share of ALL ``N`` labels to flip, in ``[0, 1]`` (``round(fraction · N)`` of them).
    n_classes : int, optional
        Number of classes (at least 2); default ``labels.max() + 1``.
    mode : {"random", "targeted"}, default "random"
        ``"random"``: each flipped label becomes one of the other ``n_classes − 1`` classes, uniformly.
        ``"targeted"``: every flipped label becomes ``target``.
    target : int, optional
        Required for ``mode="targeted"``, must be ``None`` otherwise.
    source_classes : int or sequence of int, optional
        Classes whose labels may be flipped; default every class (every class except ``target`` when targeted,
        where ``target`` may not be a source).
    seed : int, default 0
        Seed of the ``numpy.random.default_rng`` that picks the samples and, for random flips, the new classes.

    Returns
    -------
    PoisonedData
        ``images=None``, new labels (same dtype; every flipped label differs from the original), the sorted int64
        flipped indices, ``target`` (``None`` for random flips) and a description. The input is not modified.
    """
    y = _as_labels(labels, None)
    k = _n_classes(y, n_classes)
    frac = _as_fraction(fraction)
    s = _as_int(seed, "seed", 0)
    if mode not in _FLIP_MODES:
        raise ValueError(f"mode must be one of {_FLIP_MODES}, got {mode!r}")
    if k < 2:
        raise ValueError(f"label flipping needs at least 2 classes, got n_classes {k}")
    rng = np.random.default_rng(s)
    out = y.copy()
    if mode == "random":
        if target is not None:
            raise ValueError(f"target is only used with mode='targeted', got target {target!r} with mode='random'")
        sources = _source_classes(source_classes, k, None)
        idx = _select(y, frac, sources, rng)
        # A shift by 1..k−1 (mod k) is uniform over the other classes and never returns the original label.
        shift = rng.integers(1, k, size=len(idx))
        out[idx] = ((y[idx].astype(np.int64) + shift) % k).astype(y.dtype)
        t = None
        what = f"random flips among {k} classes"
    else:
        if target is None:
            raise ValueError("mode='targeted' needs a target class, got target None")
        t = _as_target(target, k, y)
        sources = _source_classes(source_classes, k, t)
        if np.any(sources == t):
            raise ValueError(f"source_classes {sources.tolist()} include the target {t}; its labels cannot be flipped")
        idx = _select(y, frac, sources, rng)
        out[idx] = t
        what = f"targeted flips to {t}"
    description = (
        f"label_flip: {what} on {len(idx)} of {len(y)} labels (fraction {frac:g}) from classes "
        f"{_classes_str(sources)}, seed {s}"
    )
    return PoisonedData(None, out, idx, t, description)
