"""Capture a model's activations at one layer into a shard folder, one batch at a time."""

from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._interop import describe
from .._progress import Progress
from ..ops.covariance import _as_int
from .arrays import import_optional
from .base import DtypeLike, dtype_name
from .shards import ShardSource, ShardWriter, _prepare_folder


class _StopForward(Exception):
    """Raised by the hook once the layer's output is in hand: the layers after it need not run."""


def _split_batch(batch: Any, torch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(f"the loader must yield x or (x, y) batches, got {describe(batch)}")


def _unknown_layer(layer: str, names: list[str]) -> ValueError:
    close = difflib.get_close_matches(layer, names, n=3)
    hint = f"; did you mean {close}?" if close else ""
    shown = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
    return ValueError(f"the model has no submodule {layer!r}{hint} Valid names include: {shown}")


def capture_activations(
    model: Any,
    loader: Any,
    layer: str,
    out: str | os.PathLike,
    *,
    device: Any = "cpu",
    dtype: DtypeLike = np.float16,
    max_batches: int | None = None,
    progress: bool = True,
    rows_per_shard: int | None = None,
    overwrite: bool = False,
) -> ShardSource:
    """Runs ``model`` over ``loader`` and stores the output of submodule ``layer`` as a shard folder at ``out``.

    Parameters
    ----------
    model : torch.nn.Module
        Moved to ``device`` (in place, as ``model.to`` does) and run in eval mode under ``torch.no_grad``; its
        training mode is restored afterwards.
    loader : iterable
        Yields ``x`` or ``(x, y)`` batches (a ``DataLoader``, e.g. over a ``TensorDataset``); ``x`` is moved to
        ``device``; ``y``, when present, must be integer class ids ``[batch]`` and is written to ``labels.npy``.
    layer : str
        A name from ``dict(model.named_modules())`` (``""`` is the whole model). A forward hook takes its output,
        which must be a tensor ``[batch, ...]``; it is flattened to ``[batch, features]`` (a conv map
        ``[B, C, H, W]`` becomes ``[B, C·H·W]``, channel-major). The rest of the forward pass is skipped (a module
        used several times in one pass is captured at its first call).
    out : path
        The shard folder; refused when it exists and is not empty, unless ``overwrite=True`` (see ShardWriter).
    dtype : float16 (default), bfloat16, float32 or float64
        Storage dtype; the cast happens on ``device`` before the copy to the host.
    max_batches : int, optional
        Stop after this many batches.
    progress : bool
        A progress bar on stderr (tqdm when installed).
    rows_per_shard : int, optional
        See :class:`ShardWriter`.

    Returns
    -------
    ShardSource
        The store just written. Memory: one batch of activations plus the writer's one shard buffer. If anything
        fails, no manifest is written (the folder is then not a readable store).
    """
    torch = import_optional("torch", "torch", "capture_activations")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {describe(model)}")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a submodule name (str), got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer not in modules:
        raise _unknown_layer(layer, [n for n in modules if n])
    name = dtype_name(dtype)
    torch_dtype = getattr(torch, name)
    if max_batches is not None:
        max_batches = _as_int(max_batches, "max_batches", 1)
    device = torch.device(device)
    _prepare_folder(Path(out), overwrite)  # fail before any forward pass
    try:
        total: int | None = len(loader)
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)

    captured: list[Any] = []

    def hook(module: Any, inputs: Any, output: Any) -> None:
        captured.append(output)
        raise _StopForward

    handle = modules[layer].register_forward_hook(hook)
    was_training = model.training
    model.to(device)
    model.eval()
    bar = Progress(total, progress, desc=f"capture {layer or 'model'}")
    writer: ShardWriter | None = None
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = _split_batch(batch, torch)
                if isinstance(x, torch.Tensor):
                    x = x.to(device, non_blocking=True)
                captured.clear()
                with contextlib.suppress(_StopForward):
                    model(x)
                if not captured:
                    raise RuntimeError(f"layer {layer!r} did not run in the forward pass of batch {i}")
                act = captured.pop()
                if not isinstance(act, torch.Tensor) or act.dim() == 0:
                    raise TypeError(
                        f"layer {layer!r} returned {describe(act)}; hook a submodule whose output is a tensor "
                        "[batch, ...]"
                    )
                act = act.detach().reshape(act.shape[0], -1).to(dtype=torch_dtype).cpu()
                if writer is None:
                    writer = ShardWriter(out, act.shape[1], name, rows_per_shard, overwrite=overwrite)
                if isinstance(y, torch.Tensor):
                    y = y.cpu()
                writer.append(act, labels=y)
                bar.update(act.shape[0])
                del act, x, y, batch
        if writer is None:
            raise ValueError("the loader yielded no batches; nothing to capture")
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        handle.remove()
        model.train(was_training)
        bar.close()
    return ShardSource(out)
