"""The samples behind a spike: one step's batch taken apart, each sample's gradient computed alone.

At a spike, the question after "when" is "which data". The batch gradient is the sum of the samples'
gradients (for a loss that is a mean or a sum over them), so each sample's part in the spike is its
share of the batch gradient's squared norm::

    share_i = <g_i, G> / |G|^2,   G = sum_j g_j     (the shares sum to 1)

A corrupted sample that carries the spike has a share near 1; in a batch where every sample is hot, the
shares are near 1/B each. Samples whose gradient is not finite are listed first, with no share.

How each g_i is computed: ``torch.func`` (``vmap`` of ``grad`` over the batch's leading dimension) where
the model can be vmapped, else one backward pass per sample. Both run with the model in eval mode, so a
sample's gradient is its own (dropout off, normalization by the running statistics rather than by the
batch's), no random number is drawn, no running statistic moves and no ``.grad`` is touched: the run
goes on exactly as it would have. Where a running statistic is itself not finite (the step's training
forward put a non-finite sample into a BatchNorm), every sample would read it in eval mode, so each one
runs alone in train mode instead, with the buffers and the random number generators put back after. It costs about one forward and backward pass of the whole batch
(vmap), or B passes of one sample (the loop), plus B copies of the gradient held at once for vmap, in
chunks of ``CHUNK`` samples.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..analyse.profile import SampleShare, SpikeSamples

CHUNK = 16  # samples whose gradients are held at once
MOST_SAMPLES = 8  # samples named per spike, largest share first
LossOf = Callable[[Any], torch.Tensor]


def batch_size(batch: Any) -> Optional[int]:
    """The batch's leading dimension: that of its first tensor (in a tensor, tuple, list or dict)."""
    for leaf in _leaves(batch):
        if leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def take(batch: Any, rows: slice, size: int) -> Any:
    """The batch cut to ``rows`` of its leading dimension: every tensor whose first dimension is ``size``."""
    if isinstance(batch, torch.Tensor):
        return batch[rows] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {k: take(v, rows, size) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(take(v, rows, size) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(take(v, rows, size) for v in batch)
    return batch


def _nonfinite_rows(batch: Any, size: int) -> Tuple[int, ...]:
    """The samples whose own floating-point tensors in the batch hold an inf or a NaN."""
    bad = torch.zeros(size, dtype=torch.bool)
    for leaf in _leaves(batch):
        if leaf.dim() > 0 and leaf.shape[0] == size and (leaf.is_floating_point() or leaf.is_complex()):
            bad |= (~torch.isfinite(leaf)).reshape(size, -1).any(1).cpu()
    return tuple(int(i) for i in bad.nonzero().flatten())


def _leaves(batch: Any) -> List[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _leaves(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _leaves(v)]
    return []


def per_sample(model: nn.Module, batch: Any, loss_of: LossOf, *, step: int, global_norm: float = float("nan"),
               z: float = float("nan"), why: str = "spike", previous: Any = None) -> SpikeSamples:
    """Each sample's gradient norm, loss and share of the batch gradient, at the model's current weights.

    ``loss_of(batch)`` runs the model on a batch and returns the scalar loss (the loss of one sample when
    given a batch of one). With ``previous`` (the batch of the step before), its loss at the same weights
    is measured too: the same weights on other data tell the batch from the weights. Never raises for
    the model's sake: where the samples cannot be taken apart, the record says why in ``error``."""
    began = time.perf_counter()
    size = batch_size(batch)
    record = dict(step=step, global_norm=float(global_norm), z=float(z), why=why, batch_size=size or 0, batch=batch,
                  nonfinite_inputs=_nonfinite_rows(batch, size) if size else ())
    if not size:
        return SpikeSamples(samples=(), method="none", seconds=0.0, error="the batch holds no tensor with a batch "
                            "dimension", **record)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    modes = [(m, m.training) for m in model.modules()]
    if not all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point()):
        # the step's own training forward put a non-finite sample into a running statistic (BatchNorm's),
        # so that in eval mode every sample would read it: each sample alone in train mode instead
        return _in_train_mode(model, batch, size, params, loss_of, began, record, modes)
    model.eval()
    try:
        before = math.nan
        with torch.no_grad():  # the whole batch's loss, and its predecessor's, the same way at the same weights
            whole = float(loss_of(batch))
            if previous is not None:
                before = float(loss_of(previous))
        with torch.enable_grad():
            try:
                (grads, losses), method = _by_vmap(model, batch, size, params, loss_of), "vmap"
            except Exception:  # noqa: BLE001 - vmap refuses many models (in-place ops, .item()): one pass each
                (grads, losses), method = _by_loop(batch, size, params, loss_of), "loop"
    except Exception as exc:  # noqa: BLE001 - a model that cannot run one sample alone: say so, go on
        return SpikeSamples(samples=(), method="none", seconds=time.perf_counter() - began,
                            error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200], **record)
    finally:
        for m, mode in modes:
            m.training = mode
    return SpikeSamples(samples=_shares(grads, losses), method=method, seconds=time.perf_counter() - began,
                        batch_loss=whole, previous_loss=before, **record)


def _in_train_mode(model: nn.Module, batch: Any, size: int, params: Dict[str, nn.Parameter], loss_of: LossOf,
                   began: float, record: Dict[str, Any], modes) -> SpikeSamples:
    """One backward per sample in train mode (a normalization layer then normalizes each sample by its own
    statistics), with the buffers and the random number generators put back as they were."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index for p in params.values() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.train()
            grads, losses = _by_loop(batch, size, params, loss_of)
    except Exception as exc:  # noqa: BLE001 - as in per_sample: say why, go on
        return SpikeSamples(samples=(), method="none", seconds=time.perf_counter() - began,
                            error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200], **record)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for m, mode in modes:
            m.training = mode
    return SpikeSamples(samples=_shares(grads, losses), method="loop, train mode", seconds=time.perf_counter() - began,
                        **record)


def _shares(chunks: List[Tuple[torch.Tensor, ...]], losses: torch.Tensor) -> Tuple[SampleShare, ...]:
    """From each chunk's per-sample gradients (one tensor per parameter, samples first): norms, the sum G
    of the finite ones, and each sample's <g_i, G> / |G|^2 (a complex gradient counts as its real and
    imaginary parts)."""
    chunks = [tuple(_flat(g) for g in chunk) for chunk in chunks]
    norm_sq = torch.cat([sum(g.pow(2).sum(1) for g in chunk) for chunk in chunks])
    finite = torch.isfinite(norm_sq)
    total: Optional[List[torch.Tensor]] = None
    start = 0
    for chunk in chunks:
        n = chunk[0].shape[0]
        keep = finite[start:start + n].to(chunk[0].device).view(-1, 1)
        parts = [torch.where(keep, g, 0.0).sum(0) for g in chunk]
        total = parts if total is None else [a + b for a, b in zip(total, parts)]
        start += n
    dots = torch.cat([sum((torch.where(torch.isfinite(g), g, 0.0) * t).sum(1) for g, t in zip(chunk, total))
                      for chunk in chunks])
    whole = float(sum(t.pow(2).sum() for t in total))
    nan = torch.full_like(dots, float("nan"))
    share = torch.where(finite, dots / whole if whole > 0 else nan, nan)
    rows = [SampleShare(index=i, grad_norm=float(norm_sq[i].sqrt()), loss=float(losses[i]), share=float(share[i]))
            for i in range(len(norm_sq))]
    rows.sort(key=lambda r: (np.isfinite(r.grad_norm), -r.share if np.isfinite(r.share) else 0.0))
    return tuple(rows[:MOST_SAMPLES])


def _flat(g: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients (samples first) as rows of float64: a complex one as its real and imaginary parts."""
    if g.is_complex():
        g = torch.view_as_real(g)
    return g.reshape(g.shape[0], -1).double()


def _by_vmap(model: nn.Module, batch: Any, size: int, params: Dict[str, nn.Parameter], loss_of: LossOf):
    """Per-sample gradients by torch.func: ``grad`` of one sample's loss, vmapped over the batch in chunks."""
    from torch.func import functional_call, grad_and_value, vmap

    names = list(params)
    wrapper = _Loss(model, loss_of)
    buffers = {f"model.{n}": b for n, b in model.named_buffers()}
    weights = {f"model.{n}": p.detach() for n, p in params.items()}
    grads, losses = [], []
    for begin in range(0, size, CHUNK):
        chunk = take(batch, slice(begin, begin + CHUNK), size)
        dims = _in_dims(chunk, min(CHUNK, size - begin))

        def one(w: Dict[str, torch.Tensor], sample: Any, dims: Any = dims) -> torch.Tensor:
            return functional_call(wrapper, ({**w, **buffers},), (_unsqueezed(sample, dims),)).reshape(())

        g, loss = vmap(grad_and_value(one), in_dims=(None, dims))(weights, chunk)
        grads.append(tuple(g[f"model.{n}"] for n in names))
        losses.append(loss.detach())
    return grads, torch.cat(losses)


class _Loss(nn.Module):
    """The user's loss as a module over the model, for ``functional_call``: it swaps the model's weights."""

    def __init__(self, model: nn.Module, loss_of: LossOf) -> None:
        super().__init__()
        self.model, self._loss_of = model, loss_of

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss_of(batch)


def _by_loop(batch: Any, size: int, params: Dict[str, nn.Parameter], loss_of: LossOf):
    """Per-sample gradients by one backward pass per sample (``torch.autograd.grad``: no ``.grad`` touched)."""
    names = list(params)
    tensors = [params[n] for n in names]
    grads, losses = [], []
    for begin in range(0, size, CHUNK):
        rows: List[Tuple[torch.Tensor, ...]] = []
        for i in range(begin, min(begin + CHUNK, size)):
            loss = loss_of(take(batch, slice(i, i + 1), size)).reshape(())
            got = torch.autograd.grad(loss, tensors, allow_unused=True)
            rows.append(tuple(torch.zeros_like(t) if g is None else g.detach() for g, t in zip(got, tensors)))
            losses.append(loss.detach())
        grads.append(tuple(torch.stack(column) for column in zip(*rows)))
    return grads, torch.stack(losses)


def _in_dims(batch: Any, size: int) -> Any:
    """vmap's in_dims for a batch: 0 for every tensor whose first dimension is the batch's, else None."""
    if isinstance(batch, torch.Tensor):
        return 0 if batch.dim() > 0 and batch.shape[0] == size else None
    if isinstance(batch, Mapping):
        return {k: _in_dims(v, size) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_in_dims(v, size) for v in batch) if not hasattr(batch, "_fields") else \
            type(batch)(*(_in_dims(v, size) for v in batch))
    return None


def _unsqueezed(sample: Any, dims: Any) -> Any:
    """One sample (vmap took the batch dimension of each tensor whose ``dims`` is 0) as a batch of one."""
    if isinstance(sample, torch.Tensor):
        return sample.unsqueeze(0) if dims == 0 else sample
    if isinstance(sample, Mapping):
        return {k: _unsqueezed(v, dims[k]) for k, v in sample.items()}
    if isinstance(sample, tuple) and hasattr(sample, "_fields"):
        return type(sample)(*(_unsqueezed(v, d) for v, d in zip(sample, dims)))
    if isinstance(sample, (list, tuple)):
        return type(sample)(_unsqueezed(v, d) for v, d in zip(sample, dims))
    return sample
