"""The device side of an observed step: parameters bucketed by device and dtype, and their arithmetic.

A Bucket lays out a fixed sample of its gradients in two alternating float32 buffers; the |g|
histogram is counted on the sample and the step-to-step cosine is the dot product of two samples.
StepSums holds one step's per-layer figures on the device until they are reduced and copied to the
host as a HostRow.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import distributed, segments
from ..analyse import histogram as hist

SAMPLE_MIN = 1 << 16  # parameters at least this large have their histogram and cosine sampled
SAMPLE_BLOCK = 1024


class Bucket:
    """Trainable parameters sharing a device and dtype, and the sample buffers their gradients feed.

    Each step a fixed sample of every gradient is copied into one of two float32 buffers: all of a
    small parameter, and one block of SAMPLE_BLOCK elements in ``sample`` of a large one, spread evenly
    over it. The |g| histogram is counted on the sample and the step-to-step cosine is the dot product
    of this step's sample with the last one, large parameters' blocks weighted by ``sample``. A small
    parameter sits whole in the sample, so its exact figures (norm, max, sum, non-finite count) are
    read off the buffer in a few batched ops (see :mod:`~gradscope.collect.segments`); a large one's are read
    off its gradient, one tensor at a time, each a bandwidth-bound pass anyway.
    """

    def __init__(self, params: List[nn.Parameter], groups: List[int], device: torch.device, sample: int,
                 ctx: Optional[distributed.Context]) -> None:
        self.params = params
        self.groups = np.asarray(groups, dtype=np.int64)
        self.dtype = params[0].dtype
        self.device = device
        self.param_group = torch.tensor(groups, device=device)
        self.sample = sample
        # Under a process group: a sharded (DTensor) bucket's figures are summed over ranks as they are;
        # a replicated one's are the same on every rank, so each rank adds 1/world of them, and only
        # rank 0 counts its histogram and its non-finite elements.
        self.sharded = distributed.is_sharded(params[0])
        self.complex = params[0].is_complex()  # one dtype per bucket: all complex or none
        # norms accumulate in float32 at least (a float16 norm overflows at 65504); float64 stays float64
        self.norm_dtype = None if self.dtype in (torch.float64, torch.complex128) else torch.float32
        self.share = 1.0 if ctx is None or self.sharded else 1.0 / ctx.world
        self.counts_histogram = ctx is None or self.sharded or ctx.rank == 0
        locals_ = [distributed.local(p) for p in params]
        numels = [t.numel() for t in locals_]
        self.rows = [n // SAMPLE_BLOCK if sample > 1 and n >= SAMPLE_MIN else 0 for n in numels]
        sizes = [len(range(0, r, sample)) * SAMPLE_BLOCK if r else n for n, r in zip(numels, self.rows)]
        # A float64 bucket reads every figure off the gradients: its float32 sample could round or overflow.
        self.wide = self.dtype in (torch.float64, torch.complex128)
        self.blocked = [i for i, r in enumerate(self.rows) if r]
        self.direct = [i for i, r in enumerate(self.rows) if r or self.wide]  # figures read off the gradient
        whole = [i for i, r in enumerate(self.rows) if not r]
        whole = [whole[k] for k in segments.order([sizes[i] for i in whole])]
        # Sampled blocks first (one region weighted by ``sample`` in the cosine), then whole parameters,
        # equal sizes side by side so that each run of them is reduced in one op.
        starts, at = [0] * len(params), 0
        for i in self.blocked + whole:
            starts[i], at = at, at + sizes[i]
        self.weighted = sum(sizes[i] for i in self.blocked)
        self.buffers = [torch.zeros(at, dtype=torch.float32, device=device) for _ in range(2)]
        self.bits = torch.empty(at, dtype=torch.int32, device=device)
        self.ones = torch.ones(1, dtype=torch.int64, device=device).expand(at)  # the histogram's increments
        # A whole parameter's slot has the gradient's own shape, so the copy needs no per-step reshape.
        shape = lambda i: (sizes[i] // SAMPLE_BLOCK, SAMPLE_BLOCK) if self.rows[i] else locals_[i].shape  # noqa: E731
        self.dest = [[buf[starts[i]:starts[i] + sizes[i]].view(shape(i)) for i in range(len(params))]
                     for buf in self.buffers]
        self.sampled = sizes if self.counts_histogram else [0] * len(sizes)
        self.small = [] if self.wide else [i for i in whole if sizes[i]]  # figures read off the sample
        self.small_group = torch.tensor([groups[i] for i in self.small], dtype=torch.int64, device=device)
        self.segments = segments.Segments([sizes[i] for i in self.small], self.weighted, device)
        self.direct_group = self.param_group[self.direct] if self.direct else None
        base = torch.empty(at, dtype=torch.int32)
        for i in range(len(params)):  # each element's histogram bins start at its group's offset
            base[starts[i]:starts[i] + sizes[i]] = groups[i] * hist.N_BINS
        self.bin_base = base.to(device)
        self.current = 0
        # The weights' snapshot, for the update: one flat copy, laid out like the sample's whole parameters.
        weights = self.weights()
        lengths = [w.numel() for w in weights]
        self.weight_order = segments.order(lengths)
        self.weight_segments = segments.Segments([lengths[i] for i in self.weight_order], 0, device)
        self.weight_group = self.param_group[self.weight_order]
        self.snapshot: Optional[torch.Tensor] = None
        self.snapshot_views: List[torch.Tensor] = []
        self.weight_sq: Optional[torch.Tensor] = None

    def source(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """The view of a gradient that the sample reads: whole, or every ``sample``-th block."""
        rows = self.rows[i]
        if not rows:
            return grad
        flat = grad.reshape(-1)
        return flat[: rows * SAMPLE_BLOCK].view(rows, SAMPLE_BLOCK)[:: self.sample]

    def gradients(self) -> Tuple[List[int], List[torch.Tensor]]:
        """The indices of the parameters that have a gradient this step, and those gradients, as the
        arithmetic reads them: dense, real (|g| for a complex gradient) and this rank's part.

        The one Python pass over the parameters on the hot path: reading ``.grad`` is a per-tensor
        attribute access that no batched op can do for us.
        """
        grads = [p.grad for p in self.params]
        if self.sharded:
            grads = [None if g is None else distributed.local(g) for g in grads]
        index = list(range(len(grads)))
        if self.complex or any(g is None or g.is_sparse for g in grads):  # rare: build the list with care
            index = [i for i, g in enumerate(grads) if g is not None]
            grads = [_readable(grads[i]) for i in index]
        return index, grads

    def measure(self, acc: "StepSums", inverse_scale: Optional[torch.Tensor], histogram: Optional[torch.Tensor],
                dot: bool) -> np.ndarray:
        """Add this step's gradient figures to ``acc`` and its |g| counts to ``histogram`` (None: a step
        whose histogram is not counted); returns which groups had a gradient.

        The gradients are read by one ``_foreach_copy_`` into the sample, and the large parameters' also
        for their exact figures (see ``_direct``). Everything else works on the flat sample: runs of
        equal-sized parameters reduce in one op each, the |g| histogram is one scatter, and on an
        accelerator no op here waits for the device.
        """
        dev = acc.norm_sq.device
        present = np.zeros(acc.norm_sq.numel(), dtype=bool)
        index, grads = self.gradients()
        dest = self.dest[self.current]
        buffer = self.buffers[self.current]
        whole = len(index) == len(self.params)
        if not whole:
            for i in set(range(len(self.params))) - set(index):
                dest[i].zero_()  # an unused parameter reads as zeros in the histogram, the sums and the cosine
        if grads:
            present[self.groups if whole else self.groups[index]] = True
            sources = grads
            if self.blocked and whole:  # only large parameters need a strided view; the rest copy as they are
                sources = list(grads)
                for i in self.blocked:
                    sources[i] = self.source(i, grads[i])
            elif self.blocked:
                sources = [self.source(i, g) if self.rows[i] else g for i, g in zip(index, grads)]
            torch._foreach_copy_(dest if whole else [dest[i] for i in index], sources)
        if inverse_scale is not None:
            buffer.mul_(inverse_scale.to(buffer.device))
        if grads and self.direct:
            self._direct(acc, index, grads, inverse_scale, whole)
        torch.bitwise_and(buffer.view(torch.int32), hist.ABS_MASK, out=self.bits)  # |g|'s bits (sign masked off)
        if self.small:
            at, magnitude = self.small_group.to(dev), self.bits.view(torch.float32)
            acc.norm_sq.index_add_(0, at, self.segments.sum_sq(buffer).to(dev), alpha=self.share)
            acc.grad_sum.index_add_(0, at, self.segments.sum(buffer).to(dev), alpha=self.share)
            tops = self.segments.max(magnitude)
            acc.max_abs.scatter_reduce_(0, at, tops.to(dev), reduce="amax")
            if histogram is None and self.counts_histogram:  # the histogram would have counted inf and NaN
                self._count_small_nonfinite(acc, buffer, tops)
        if self.counts_histogram and histogram is not None:
            self._count(acc, histogram)
        if dot:
            acc.dot.add_(sample_dot(self).to(dev), alpha=self.share)
        self.current = 1 - self.current
        return present

    def clip_sums(self, method: str, threshold: float, eps: float, inverse_scale: Optional[torch.Tensor],
                  out: torch.Tensor, excluded: frozenset = frozenset()) -> None:
        """Add this bucket's share of the user's clipping sums to ``out`` (see ``gradscope.collect.clipping``): the
        elements (value) or units (AGC, timm's ``adaptive_clip_grad``) capped, the post-clip squared norm,
        and the dot product of the clipped with the unclipped gradient; parameters in ``excluded`` (ids)
        are AGC's, left alone. Only when the user's loop clips that way; a fixed number of batched ops
        whatever the number of tensors, on the device, no wait."""
        index, grads = self.gradients()
        if not grads:
            return
        if grads[0].dtype in (torch.float16, torch.bfloat16):
            grads = [g.float() for g in grads]
        if inverse_scale is not None:
            grads = torch._foreach_mul(grads, inverse_scale.to(grads[0].device))
        dtype = out.dtype
        if method == "value":
            sums = _value_sums(grads, threshold, dtype)
        else:
            params = [distributed.local(self.params[i]).detach() for i in index]
            sums = _agc_sums(grads, params, [id(self.params[i]) in excluded for i in index], threshold, eps, dtype)
        out.add_(sums.to(out.device), alpha=self.share)

    def _count_small_nonfinite(self, acc: "StepSums", buffer: torch.Tensor, tops: torch.Tensor) -> None:
        """The whole parameters' inf/NaN counts on a step without a histogram; as in ``_direct``, a CPU
        counts only when a slice's max is not finite, an accelerator every step rather than sync."""
        if _count_can_be_skipped(tops):
            return
        bad = self.segments.count_nonfinite(buffer)
        acc.nonfinite.index_add_(0, self.small_group.to(acc.nonfinite.device), bad.to(acc.nonfinite))

    def _count(self, acc: "StepSums", histogram: torch.Tensor) -> None:
        """Add the sample's |g| bins to ``histogram``; the step's zeros (sampled) and the whole parameters'
        inf/NaN (exact) are what its zero and non-finite bins gained."""
        dev = acc.norm_sq.device
        bins = histogram.view(-1, hist.N_BINS)
        zeros_before = bins[:, 0].clone()
        nonfinite_before = bins[:, hist.NONFINITE_FIRST:].sum(1)
        self.bits.bitwise_right_shift_(hist.SHIFT).add_(self.bin_base)  # bin = top bits of |g| + group offset
        w = self.weighted
        _add_counts(histogram, self.bits[w:], self.ones[w:])  # whole parameters first: their count is exact
        if not self.wide:  # (a float64 bucket counts its non-finite elements off the gradients)
            acc.nonfinite.add_((bins[:, hist.NONFINITE_FIRST:].sum(1) - nonfinite_before).to(dev, acc.nonfinite.dtype))
        if w:
            _add_counts(histogram, self.bits[:w], self.ones[:w])
        acc.zeros.add_((bins[:, 0] - zeros_before).to(dev, acc.zeros.dtype))

    def _direct(self, acc: "StepSums", index: List[int], grads: List[torch.Tensor],
                inverse_scale: Optional[torch.Tensor], whole: bool) -> None:
        """Norm, max |g|, sum and non-finite count, exact, of the parameters not held whole in the sample.

        One ``_foreach_norm`` for the norms. The max: on an accelerator one fused ``_foreach_norm(inf)``;
        a CPU runs that several times slower than one ``aminmax`` per tensor, so there each tensor gets
        its own call. Sums and non-finite counts are one call per tensor: torch has no batched sum, and
        each is a pass over a large tensor, whose cost is its bandwidth, not the call.
        """
        dev = acc.norm_sq.device
        groups = None  # the chosen gradients' groups, when they are not all of self.direct (then on the host)
        if whole:
            chosen = [grads[i] for i in self.direct]
        else:
            direct = set(self.direct)
            picked = [k for k, i in enumerate(index) if i in direct]
            chosen, groups = [grads[k] for k in picked], self.groups[[index[k] for k in picked]]
        if self.sharded and any(g.numel() == 0 for g in chosen):  # a rank may hold an empty shard
            keep = [k for k, g in enumerate(chosen) if g.numel()]
            groups = (self.groups[self.direct] if groups is None else groups)[keep]
            chosen = [chosen[k] for k in keep]
        if not chosen:
            return
        # Indexing a device tensor with a host list copies the index over and waits for the device; the
        # groups are picked on the host instead and sent without waiting (a pageable copy is staged at once).
        at = self.direct_group.to(dev) if groups is None else torch.from_numpy(groups).to(dev, non_blocking=True)
        norm_sq = torch.stack(torch._foreach_norm(chosen, 2, dtype=self.norm_dtype)).to(dev, torch.float32) ** 2
        if chosen[0].device.type == "cpu":
            extremes = [torch.aminmax(g) for g in chosen]
            tops = torch.stack([torch.maximum(hi, -lo) for lo, hi in extremes])
        else:
            tops = torch.stack(torch._foreach_norm(chosen, float("inf"), dtype=self.norm_dtype))
        tops = tops.to(dev, torch.float32)
        totals = torch.stack([g.sum(dtype=torch.float32) for g in chosen]).to(dev)
        if inverse_scale is not None:  # the sample was unscaled in place; the gradients were not
            scale = inverse_scale.to(dev)
            norm_sq, tops, totals = norm_sq * scale**2, tops * scale, totals * scale
        acc.norm_sq.index_add_(0, at, norm_sq, alpha=self.share)
        acc.max_abs.scatter_reduce_(0, at, tops, reduce="amax")
        acc.grad_sum.index_add_(0, at, totals, alpha=self.share)
        if not self.counts_histogram:  # one rank counts a replicated bucket's inf and NaN
            return
        # The max is NaN or inf exactly where a count is due. On the CPU, reading it waits for nothing (there
        # is no queue to drain), so the count runs only then; an accelerator counts every step rather than
        # sync. g - g is NaN exactly at inf and NaN (and counts several times faster than isfinite).
        if _count_can_be_skipped(tops):
            return
        bad = torch.stack([torch.count_nonzero(g - g) for g in chosen])
        acc.nonfinite.index_add_(0, at, bad.to(dev, acc.nonfinite.dtype))

    def weights(self) -> List[torch.Tensor]:
        """The weights as the arithmetic reads them (under ``torch.no_grad``: the parameters themselves,
        with no per-step ``detach`` per tensor), this rank's part, complex ones as real pairs."""
        if not (self.sharded or self.complex):
            return self.params
        weights = [distributed.local(p.detach()) if self.sharded else p.detach() for p in self.params]
        return [torch.view_as_real(w) for w in weights] if self.complex else weights

    def measure_weights(self, acc: "StepSums", measure: bool, snapshot: bool) -> None:
        """Weight norms (read with the snapshots: they move slowly) and the update since the last snapshot."""
        dev = acc.norm_sq.device
        if measure or snapshot or self.weight_sq is None:
            weights = self.weights()
            if measure or snapshot:
                change = weight_change_sq(self, weights, measure, snapshot)
                acc.update_sq.index_add_(0, self.weight_group.to(dev), change.to(dev), alpha=self.share)
            if snapshot or self.weight_sq is None:
                if snapshot:  # the snapshot holds the weights now: their norms are one op per run
                    self.weight_sq = self.weight_segments.sum_sq(self.snapshot).float()
                else:
                    self.weight_sq = torch.stack(torch._foreach_norm(
                        [weights[i] for i in self.weight_order], 2, dtype=self.norm_dtype)).float() ** 2
        acc.weight_sq.index_add_(0, self.weight_group.to(dev), self.weight_sq.to(dev), alpha=self.share)


def _count_can_be_skipped(tops: torch.Tensor) -> bool:
    """Whether an inf/NaN count may be skipped: on the CPU, where reading the maxima waits for nothing,
    when every one is finite. An accelerator counts every step rather than sync."""
    return tops.device.type == "cpu" and bool(torch.isfinite(tops).all())


def _add_counts(histogram: torch.Tensor, bins: torch.Tensor, ones: torch.Tensor) -> None:
    """Add one to ``histogram`` at each of ``bins``. A scatter into the running counts, except on a CPU
    with many elements per bin, where counting into a fresh vector and adding it is faster (an
    accelerator's ``bincount`` reads the largest bin back to the host first: a sync)."""
    if bins.device.type == "cpu" and histogram.numel() * 8 <= bins.numel():
        histogram.add_(torch.bincount(bins, minlength=histogram.numel()))
    else:
        histogram.index_add_(0, bins, ones)


def _readable(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as the arithmetic reads it: sparse ones made dense, complex ones as their magnitude |g|
    (so the 2-norm and max are those of the complex values, not of their real part)."""
    if grad.is_sparse:
        grad = grad.to_dense()
    if grad.is_complex():
        grad = grad.abs()
    return grad


@dataclasses.dataclass
class StepSums:
    """The device-side figures of one step, per group, before they are reduced and moved to the host."""

    norm_sq: torch.Tensor
    max_abs: torch.Tensor
    grad_sum: torch.Tensor
    weight_sq: torch.Tensor
    update_sq: torch.Tensor
    dot: torch.Tensor
    zeros: torch.Tensor  # sampled elements in the histogram's zero bin
    nonfinite: torch.Tensor  # inf and NaN elements, exact (counts: float64 where the device has it)
    clip: torch.Tensor  # the three sums of the user's value or AGC clipping (see gradscope.collect.clipping); zeros else

    @classmethod
    def zeros_like_groups(cls, groups: int, device: torch.device, count_dtype: torch.dtype,
                          clip: Optional[torch.Tensor] = None) -> "StepSums":
        """Fresh sums for one step. ``clip``: a zero vector to share while the user's clipping is not
        watched by value or AGC (nothing adds to it), so that a step allocates no more for it."""
        vectors = torch.zeros(5, groups, dtype=torch.float32, device=device)
        counts = torch.zeros(2, groups, dtype=count_dtype, device=device)
        return cls(*vectors, torch.zeros(1, dtype=torch.float32, device=device), *counts,
                   clip if clip is not None else torch.zeros(CLIP_SUMS, dtype=count_dtype, device=device))


# -- the per-step row: packed on the device, unpacked on the host; the layout is defined here alone ----------
# [norm_sq G | grad_sum G | weight_sq G | update_sq G | sampled_zeros G | nonfinite G | dot | loss | noted loss
#  | clip 3 | present G (under a process group only) | max_abs G]
# The first part is summed over ranks, max_abs is maxed; ``present`` rides in the summed part.
SUMMED_FIELDS = 6  # G-wide fields before the scalars
CLIP_SUMS = 3  # see gradscope.collect.clipping
SCALARS = 3 + CLIP_SUMS


def summed_width(groups: int, present: bool = False) -> int:
    """The length of a row's summed part."""
    return (SUMMED_FIELDS + present) * groups + SCALARS


def pack_row(acc: StepSums, loss: torch.Tensor, noted: torch.Tensor, dtype: torch.dtype,
             present: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The step's summed part and its maxima, as the device holds them before any reduction."""
    parts = [acc.norm_sq, acc.grad_sum, acc.weight_sq, acc.update_sq, acc.zeros, acc.nonfinite, acc.dot,
             loss.reshape(1), noted.reshape(1), acc.clip] + ([present] if present is not None else [])
    return torch.cat([t.to(dtype) for t in parts]), acc.max_abs


class HostRow:
    """The host copy of a step (see pack_row for the layout)."""

    def __init__(self, row: np.ndarray, G: int) -> None:
        n = SUMMED_FIELDS
        fields = [row[i * G:(i + 1) * G] for i in range(n)]
        self.norm_sq, self.grad_sum, self.weight_sq, self.update_sq, self.sampled_zeros, self.nonfinite = fields
        self.dot, self.loss, self.noted = row[n * G:n * G + 3]
        self.clip = row[n * G + 3:n * G + SCALARS]
        rest = row[n * G + SCALARS:]
        self.present = rest[:G] if len(rest) == 2 * G else None
        self.max_abs = rest[-G:]


def to_host(rows: List[Tuple[torch.Tensor, torch.Tensor]], G: int) -> List[HostRow]:
    """Rows held on the device, moved to the host in one copy: the only host sync of observing."""
    summed = torch.stack([s for s, _ in rows])
    both = torch.cat([summed, torch.stack([m for _, m in rows]).to(summed.dtype)], dim=1)
    host = both.cpu().numpy().astype(np.float64)
    return [HostRow(row, G) for row in host]


def _squares(norms: List[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The sum of the squares of per-tensor norms (a ``_foreach_norm``'s result), in ``dtype``."""
    return torch.stack(norms).to(dtype).square().sum()


def _value_sums(grads: List[torch.Tensor], v: float, dtype: torch.dtype) -> torch.Tensor:
    """Clipping by value at ``v``: elements capped, post-clip squared norm, clipped-unclipped dot product.

    With a = |g|, c = min(a, v) and e = a - c (the excess, v short of a where capped): the post-clip
    squared norm is sum c^2, the dot product sum a*c = sum c^2 + v * sum e, and the elements capped are
    e's non-zeros. Three foreach norms (L2, L1, L0) over two lists; nothing is a difference of large sums
    (the post-clip norm of a gradient mostly capped is small: subtracted out of the pre-clip norm, it
    would be lost to rounding)."""
    a = torch._foreach_abs(grads)
    c = torch._foreach_clamp_max(a, v)
    post_sq = _squares(torch._foreach_norm(c), dtype)
    torch._foreach_sub_(a, c)
    excess = torch.stack(torch._foreach_norm(a, 1)).to(dtype).sum()
    capped = torch.stack(torch._foreach_norm(a, 0)).to(dtype).sum()
    return torch.stack([capped, post_sq, post_sq + v * excess])


def _unit_norms(tensors: List[torch.Tensor]) -> torch.Tensor:
    """timm's unitwise norms of every tensor, flattened in order: a bias or gain is one unit (its norm),
    a weight's rows are its units. Tensors of one shape are stacked and reduced in one op."""
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    vectors = [i for i, t in enumerate(tensors) if t.ndim <= 1]
    if vectors:
        for i, n in zip(vectors, torch._foreach_norm([tensors[i] for i in vectors])):
            out[i] = n.reshape(1)
    by_shape: dict = {}
    for i, t in enumerate(tensors):
        if t.ndim > 1:
            by_shape.setdefault(tuple(t.shape), []).append(i)
    for shape, members in by_shape.items():
        rows = torch.linalg.vector_norm(torch.stack([tensors[i] for i in members]), dim=tuple(range(2, len(shape) + 1)))
        for i, row in zip(members, rows):
            out[i] = row
    return torch.cat(out)


def _agc_sums(grads: List[torch.Tensor], weights: List[torch.Tensor], excluded: List[bool], factor: float,
              eps: float, dtype: torch.dtype) -> torch.Tensor:
    """AGC at ``factor`` (each unit's gradient capped at factor * max(|w_unit|, eps)): units capped, post-clip
    squared norm, clipped-unclipped dot product; ``excluded`` tensors are left alone."""
    weights = [w.float() if w.dtype in (torch.float16, torch.bfloat16) else w for w in weights]
    g_norm, w_norm = _unit_norms(grads).to(dtype), _unit_norms(weights).to(dtype)
    scale = (w_norm.clamp(min=eps) * factor / g_norm.clamp(min=1e-6)).clamp(max=1.0)
    if any(excluded):
        units = [1 if g.ndim <= 1 else g.shape[0] for g in grads]
        keep = torch.repeat_interleave(torch.tensor([not e for e in excluded], device=scale.device),
                                       torch.tensor(units, device=scale.device))
        scale = torch.where(keep, scale, torch.ones_like(scale))
    sq = g_norm.square()
    return torch.stack([(scale < 1).sum().to(dtype), (scale.square() * sq).sum(), (scale * sq).sum()])


def agc_units(param: torch.Tensor) -> int:
    """Units AGC clips one by one: 1 for a bias or gain, a weight's rows otherwise."""
    return 1 if param.ndim <= 1 else int(param.shape[0])


def sample_dot(b: Bucket) -> torch.Tensor:
    """Estimated dot product of this step's gradient with the last one, from the two samples."""
    now, before = b.buffers[b.current], b.buffers[1 - b.current]
    k = b.weighted
    return b.sample * torch.dot(now[:k], before[:k]) + torch.dot(now[k:], before[k:])


def weight_change_sq(b: Bucket, weights: List[torch.Tensor], measure: bool, snapshot: bool,
                     keep: bool = False) -> torch.Tensor:
    """Squared norm of each parameter's change since the bucket's snapshot (in the snapshot's order);
    then snapshot again if asked.

    ``keep`` leaves the snapshot intact (at a cost of one allocation); otherwise it is overwritten.
    """
    dev = weights[0].device
    change = torch.zeros(len(weights), dtype=torch.float32, device=dev)
    if measure and b.snapshot is not None:
        flat, views = b.snapshot, b.snapshot_views
        if keep:
            flat = b.snapshot.clone()
            views = _views(flat, b)
        torch._foreach_sub_(views, weights)
        change = b.weight_segments.sum_sq(flat).float()
    if snapshot:
        if b.snapshot is None:
            total = sum(w.numel() for w in weights)
            b.snapshot = torch.empty(total, dtype=weights[0].dtype, device=dev)
            b.snapshot_views = _views(b.snapshot, b)
        torch._foreach_copy_(b.snapshot_views, weights)
    return change


def _views(flat: torch.Tensor, b: Bucket) -> List[torch.Tensor]:
    """Each weight's slot in a flat snapshot, in parameter order and in the weight's own shape."""
    weights = b.weights()
    views: List[Optional[torch.Tensor]] = [None] * len(weights)
    at = 0
    for i in b.weight_order:
        n = weights[i].numel()
        views[i] = flat[at:at + n].view(weights[i].shape)
        at += n
    return views
