"""The device side of an observed step: parameters bucketed by device and dtype, and their arithmetic.

A Bucket lays out a fixed sample of its gradients in two alternating float32 buffers; the |g|
histogram is counted on the sample and the step-to-step cosine is the dot product of two samples.
StepSums holds one step's per-layer figures on the device until they are reduced and copied to the
host as a HostRow.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

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
    over it. The |g| histogram is counted on the sample, and the step-to-step cosine is the dot product
    of this step's sample with the last one, large parameters' blocks weighted by ``sample``.
    """

    def __init__(self, params: List[nn.Parameter], groups: List[int], device: torch.device, sample: int,
                 ctx: Optional[distributed.Context]) -> None:
        self.params = params
        self.groups = groups
        self.dtype = params[0].dtype
        self.param_group = torch.tensor(groups, device=device)
        self.sample = sample
        # Under a process group: a sharded (DTensor) bucket's figures are summed over ranks as they are;
        # a replicated one's are the same on every rank, so each rank adds 1/world of them, and only
        # rank 0 counts its histogram.
        self.sharded = distributed.is_sharded(params[0])
        self.share = 1.0 if ctx is None or self.sharded else 1.0 / ctx.world
        self.counts_histogram = ctx is None or self.sharded or ctx.rank == 0
        numels = [distributed.local(p).numel() for p in params]
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
        shape = lambda i: (sizes[i] // SAMPLE_BLOCK, SAMPLE_BLOCK) if self.rows[i] else (sizes[i],)  # noqa: E731
        self.dest = [[buf[starts[i]:starts[i] + sizes[i]].view(shape(i)) for i in range(len(params))]
                     for buf in self.buffers]
        self.bit_views = [self.bits[starts[i]:starts[i] + sizes[i]] for i in range(len(params))]
        self.bin_offsets = [g * hist.N_BINS for g in groups]
        self.sampled = sizes if self.counts_histogram else [0] * len(sizes)
        self.current = 0
        self.previous_weights: Optional[List[torch.Tensor]] = None
        self.weight_sq: Optional[torch.Tensor] = None

    def source(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """The view of a gradient that the sample reads: whole, or every ``sample``-th block."""
        flat = grad.reshape(-1)
        rows = self.rows[i]
        return flat[: rows * SAMPLE_BLOCK].view(rows, SAMPLE_BLOCK)[:: self.sample] if rows else flat


@dataclasses.dataclass
class StepSums:
    """The device-side figures of one step, per group, before they are reduced and moved to the host."""

    norm_sq: torch.Tensor
    max_abs: torch.Tensor
    grad_sum: torch.Tensor
    weight_sq: torch.Tensor
    update_sq: torch.Tensor
    dot: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def zeros(cls, groups: int, device: torch.device) -> "StepSums":
        vectors = torch.zeros(5, groups, dtype=torch.float32, device=device)
        return cls(*vectors, torch.zeros(1, dtype=torch.float32, device=device),
                   torch.zeros(groups * hist.N_BINS, dtype=torch.int64, device=device))


class HostRow:
    """The host copy of a step: the summed figures, then the maxima (layout of Monitor.observe)."""

    def __init__(self, row: np.ndarray, G: int) -> None:
        fields = [row[i * G:(i + 1) * G] for i in range(5)]
        self.norm_sq, self.grad_sum, self.weight_sq, self.update_sq, self.sampled_zeros = fields
        self.dot, self.loss, self.noted = row[5 * G:5 * G + 3]
        rest = row[5 * G + 3:]
        self.present = rest[:G] if len(rest) == 2 * G else None
        self.max_abs = rest[-G:]


def histogram_counts(b: Bucket, n_groups: int) -> torch.Tensor:
    """Counts of the sampled |g| per (group, bin): mask the sign bit, shift, offset by group, bincount."""
    torch.bitwise_and(b.buffers[b.current].view(torch.int32), hist.ABS_MASK, out=b.bits)
    b.bits.bitwise_right_shift_(hist.SHIFT)
    torch._foreach_add_(b.bit_views, b.bin_offsets)
    return torch.bincount(b.bits, minlength=n_groups * hist.N_BINS)


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
