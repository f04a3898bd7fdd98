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

from . import distributed
from . import histogram as hist

SAMPLE_MIN = 1 << 16  # parameters at least this large have their histogram and cosine sampled
SAMPLE_BLOCK = 1024


class Bucket:
    """Trainable parameters sharing a device and dtype, and the sample buffers their gradients feed.

    Each step a fixed sample of every gradient is copied into one of two float32 buffers: all of a
    small parameter, and one block of SAMPLE_BLOCK elements in ``sample`` of a large one, spread evenly
    over it. The |g| histogram is counted on the sample and the step-to-step cosine is the dot product
    of this step's sample with the last one, large parameters' blocks weighted by ``sample``. Small
    parameters' sums (for the mean) are read off the sample in one op; large ones are summed one by one.
    """

    def __init__(self, params: List[nn.Parameter], groups: List[int], device: torch.device, sample: int,
                 ctx: Optional[distributed.Context]) -> None:
        self.params = params
        self.groups = groups
        self.dtype = params[0].dtype
        self.device = device
        self.param_group = torch.tensor(groups, device=device)
        self.sample = sample
        # Under a process group: a sharded (DTensor) bucket's figures are summed over ranks as they are;
        # a replicated one's are the same on every rank, so each rank adds 1/world of them, and only
        # rank 0 counts its histogram.
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
        # Sampled parameters first, so their blocks form one region weighted by ``sample`` in the cosine.
        order = sorted(range(len(params)), key=lambda i: self.rows[i] == 0)
        starts, at = [0] * len(params), 0
        for i in order:
            starts[i], at = at, at + sizes[i]
        self.weighted = sum(sizes[i] for i in range(len(params)) if self.rows[i])
        self.buffers = [torch.zeros(at, dtype=torch.float32, device=device) for _ in range(2)]
        self.bits = torch.empty(at, dtype=torch.int32, device=device)
        # A whole parameter's slot has the gradient's own shape, so the copy needs no per-step reshape.
        shape = lambda i: (sizes[i] // SAMPLE_BLOCK, SAMPLE_BLOCK) if self.rows[i] else locals_[i].shape  # noqa: E731
        self.dest = [[buf[starts[i]:starts[i] + sizes[i]].view(shape(i)) for i in range(len(params))]
                     for buf in self.buffers]
        self.sampled = sizes if self.counts_histogram else [0] * len(sizes)
        self.blocked = [i for i, r in enumerate(self.rows) if r]
        # Small parameters sit whole, in parameter order, after the blocks: their sums are read there.
        # (A float64 bucket reads every figure off the gradients: its float32 sample could round or overflow.)
        wide = self.dtype in (torch.float64, torch.complex128)
        small = [i for i, r in enumerate(self.rows) if not r and sizes[i] and not wide]
        self.direct = [i for i, r in enumerate(self.rows) if r or wide]  # max and sum read one by one
        self.small = small
        self.small_group = torch.tensor([groups[i] for i in small], dtype=torch.int64, device=device)
        self.small_lengths = torch.tensor([sizes[i] for i in small], dtype=torch.int64, device=device)
        self.small_total = sum(sizes[i] for i in small)
        base = torch.empty(at, dtype=torch.int32)
        for i in range(len(params)):  # each element's histogram bins start at its group's offset
            base[starts[i]:starts[i] + sizes[i]] = groups[i] * hist.N_BINS
        self.bin_base = base.to(device)
        self.current = 0
        self.previous_weights: Optional[List[torch.Tensor]] = None
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

    def measure(self, acc: "StepSums", inverse_scale: Optional[torch.Tensor], n_groups: int, dot: bool) -> np.ndarray:
        """Add this step's gradient figures to ``acc``; returns which groups had a gradient.

        Batched over the bucket: one ``_foreach_norm`` (the 2-norms) and one ``_foreach_copy_`` into the
        sample read every gradient, and the max |g| (see ``_maxima``); the rest works on the sample
        buffer, which holds small parameters whole: their sums are one ``segment_reduce`` and the
        histogram one ``bincount``. Large parameters' sums are taken one by one: torch has no batched
        sum, and each is a bandwidth-bound pass over a large tensor anyway.
        """
        dev = acc.norm_sq.device
        present = np.zeros(n_groups, dtype=bool)
        index, grads = self.gradients()
        dest = self.dest[self.current]
        buffer = self.buffers[self.current]
        whole = len(index) == len(self.params)
        if not whole:
            for i in set(range(len(self.params))) - set(index):
                dest[i].zero_()  # an unused parameter reads as zeros in the histogram, the sums and the cosine
        if grads:
            present[[self.groups[i] for i in index]] = True
            groups = self.param_group if whole else self.param_group[index]
            norms = torch._foreach_norm(grads, 2, dtype=self.norm_dtype)
            acc.norm_sq.index_add_(0, groups, torch.stack(norms).to(dev, torch.float32) ** 2, alpha=self.share)
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
        if grads:
            self._maxima(acc, index, grads, inverse_scale, whole)
        if self.small:
            sums = torch.segment_reduce(buffer[self.weighted:self.weighted + self.small_total], "sum",
                                        lengths=self.small_lengths)
            acc.grad_sum.index_add_(0, self.small_group.to(dev), sums.to(dev), alpha=self.share)
        if whole:
            large = [(i, grads[i]) for i in self.direct]
        else:
            direct = set(self.direct)
            large = [(i, g) for i, g in zip(index, grads) if i in direct]
        if self.sharded:
            large = [(i, g) for i, g in large if g.numel()]  # a rank may hold an empty shard
        if large:
            at = self.param_group[[i for i, _ in large]].to(dev)
            totals = torch.stack([g.sum(dtype=torch.float32) for _, g in large]).to(dev)
            if inverse_scale is not None:
                totals = totals * inverse_scale.to(dev)
            acc.grad_sum.index_add_(0, at, totals, alpha=self.share)
        if self.counts_histogram:  # bin = the top bits of |g| (sign masked off), offset by the group's bins
            torch.bitwise_and(buffer.view(torch.int32), hist.ABS_MASK, out=self.bits)
            self.bits.bitwise_right_shift_(hist.SHIFT).add_(self.bin_base)
            counts = torch.bincount(self.bits, minlength=n_groups * hist.N_BINS).to(dev)
            acc.counts = counts if acc.counts is None else acc.counts.add_(counts)
        if dot:
            acc.dot.add_(sample_dot(self).to(dev), alpha=self.share)
        self.current = 1 - self.current
        return present

    def _maxima(self, acc: "StepSums", index: List[int], grads: List[torch.Tensor],
                inverse_scale: Optional[torch.Tensor], whole: bool) -> None:
        """Max |g| per group, exact. On an accelerator one fused ``_foreach_norm(inf)``; a CPU runs that
        several times slower than one ``aminmax`` per tensor, so there each tensor gets its own call."""
        dev = acc.max_abs.device
        keep = range(len(grads))
        if self.sharded:  # a rank may hold an empty shard (zero-element parameters never reach a bucket)
            keep = [k for k, g in enumerate(grads) if g.numel()]
            if not keep:
                return
        tensors = grads if len(keep) == len(grads) else [grads[k] for k in keep]
        if tensors[0].device.type == "cpu":
            extremes = [torch.aminmax(g) for g in tensors]
            tops = torch.stack([torch.maximum(hi, -lo) for lo, hi in extremes])
        else:
            tops = torch.stack(torch._foreach_norm(tensors, float("inf"), dtype=self.norm_dtype))
        tops = tops.to(dev, torch.float32)
        if inverse_scale is not None:
            tops = tops * inverse_scale.to(dev)
        groups = self.param_group if whole and len(keep) == len(grads) else \
            self.param_group[[index[k] for k in keep]]
        acc.max_abs.scatter_reduce_(0, groups.to(dev), tops, reduce="amax")

    def weights(self) -> List[torch.Tensor]:
        weights = [distributed.local(p.detach()) if self.sharded else p.detach() for p in self.params]
        return [torch.view_as_real(w) for w in weights] if self.complex else weights

    def measure_weights(self, acc: "StepSums", measure: bool, snapshot: bool) -> None:
        """Weight norms (read with the snapshots: they move slowly) and the update since the last snapshot."""
        dev = acc.norm_sq.device
        weights = self.weights() if snapshot or measure or self.weight_sq is None else []
        if snapshot or self.weight_sq is None:
            self.weight_sq = torch.stack(torch._foreach_norm(weights, 2, dtype=self.norm_dtype)).float() ** 2
        acc.weight_sq.index_add_(0, self.param_group.to(dev), self.weight_sq.to(dev), alpha=self.share)
        if measure or snapshot:
            acc.update_sq.index_add_(0, self.param_group.to(dev), weight_change_sq(self, weights, measure, snapshot)
                                     .to(dev), alpha=self.share)


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
    counts: Optional[torch.Tensor]  # the step's |g| histogram (None until a bucket counts one)

    @classmethod
    def zeros(cls, groups: int, device: torch.device) -> "StepSums":
        vectors = torch.zeros(5, groups, dtype=torch.float32, device=device)
        return cls(*vectors, torch.zeros(1, dtype=torch.float32, device=device), None)


# -- the per-step row: packed on the device, unpacked on the host; the layout is defined here alone ----------
# [norm_sq G | grad_sum G | weight_sq G | update_sq G | sampled_zeros G | dot | loss | noted loss
#  | present G (under a process group only) | max_abs G]
# The first part is summed over ranks, max_abs is maxed; ``present`` rides in the summed part.


def pack_row(acc: StepSums, zeros: torch.Tensor, loss: torch.Tensor, noted: torch.Tensor, dtype: torch.dtype,
             present: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The step's summed part and its maxima, as the device holds them before any reduction."""
    parts = [acc.norm_sq, acc.grad_sum, acc.weight_sq, acc.update_sq, zeros, acc.dot, loss.reshape(1),
             noted.reshape(1)]
    summed = torch.cat([t.to(dtype) for t in parts])
    if present is not None:
        summed = torch.cat([summed, torch.from_numpy(present.astype(np.float32)).to(summed.device, dtype)])
    return summed, acc.max_abs




class HostRow:
    """The host copy of a step (see pack_row for the layout)."""

    def __init__(self, summed: torch.Tensor, maxes: torch.Tensor, G: int) -> None:
        row = torch.cat([summed, maxes.to(summed.dtype)]).cpu().numpy().astype(np.float64)  # the host sync
        fields = [row[i * G:(i + 1) * G] for i in range(5)]
        self.norm_sq, self.grad_sum, self.weight_sq, self.update_sq, self.sampled_zeros = fields
        self.dot, self.loss, self.noted = row[5 * G:5 * G + 3]
        rest = row[5 * G + 3:]
        self.present = rest[:G] if len(rest) == 2 * G else None
        self.max_abs = rest[-G:]


def sample_dot(b: Bucket) -> torch.Tensor:
    """Estimated dot product of this step's gradient with the last one, from the two samples."""
    now, before = b.buffers[b.current], b.buffers[1 - b.current]
    k = b.weighted
    return b.sample * torch.dot(now[:k], before[:k]) + torch.dot(now[k:], before[k:])


def weight_change_sq(b: Bucket, weights: List[torch.Tensor], measure: bool, snapshot: bool,
                      keep: bool = False) -> torch.Tensor:
    """Squared norm of each parameter's change since the bucket's snapshot; then snapshot again if asked.

    ``keep`` leaves the snapshot intact (at a cost of one allocation); otherwise it is overwritten.
    """
    change = torch.zeros(len(weights), dtype=torch.float32, device=weights[0].device)
    if measure and b.previous_weights is not None:
        if keep:
            diff = torch._foreach_sub(b.previous_weights, weights)
        else:
            torch._foreach_sub_(b.previous_weights, weights)
            diff = b.previous_weights
        change = torch.stack(torch._foreach_norm(diff)).float() ** 2
    if snapshot:
        if b.previous_weights is None:
            b.previous_weights = [w.clone() for w in weights]
        else:
            torch._foreach_copy_(b.previous_weights, weights)
    return change
