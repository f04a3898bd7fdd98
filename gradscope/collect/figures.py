"""A step's figures over the whole model: its parameters bucketed by device, dtype and sharding, each
bucket's arithmetic (see :mod:`~gradscope.collect.buckets`) run in turn and laid out in one row (see
:mod:`~gradscope.collect.rows`), with the extras of the sampled cadences.

The Monitor decides when (see :mod:`~gradscope.collect.cadence`); this module does the arithmetic of
all the buckets together, and nothing here waits for the device.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import distributed
from .buckets import Bucket
from .clipping import Watched
from .rows import Extras, StepLayout


class StepFigures:
    """The buckets of ``params`` (``groups``: each one's layer among ``n_groups``), read with a histogram
    sample of ``sample`` (see :class:`~gradscope.collect.sample.Sample`), under a process group ``ctx``."""

    def __init__(self, params: List[nn.Parameter], groups: List[int], n_groups: int, sample: int,
                 ctx: Optional[distributed.Context]) -> None:
        by_key: "OrderedDict[tuple, Tuple[list, list]]" = OrderedDict()
        for p, g in zip(params, groups):
            entry = by_key.setdefault((p.device, p.dtype, distributed.is_sharded(p)), ([], []))
            entry[0].append(p)
            entry[1].append(g)
        self.buckets = [Bucket(ps, gs, key[0], sample, ctx) for key, (ps, gs) in by_key.items()]
        self.device = params[0].device
        self.ctx = ctx
        self.n_groups = n_groups
        self.sharded = any(b.sharded for b in self.buckets)
        # Each step's per-tensor figures, laid out in one vector. An accelerator (which cannot look at the
        # maxima without waiting) counts every step's inf and NaN; a CPU only where a max is not finite, and
        # under a process group (whose ranks must agree on the layout) sends zeros where it did not count.
        self.layout = StepLayout(self.buckets, n_groups, count=self.device.type != "cpu",
                                 world=ctx.world if ctx else 1)
        self.zero = torch.zeros((), device=self.device)  # what a missing figure reads as
        self._no_counts: Optional[List[torch.Tensor]] = None  # a CPU rank's counts where every max was finite
        self._all_present: Optional[torch.Tensor] = None

    def sampled(self) -> np.ndarray:
        """Elements of each layer counted in the histogram per counted step, on this rank."""
        sampled = np.zeros(self.n_groups)
        for b in self.buckets:
            np.add.at(sampled, b.groups, b.sampled)
        return sampled

    # -- every observed step ------------------------------------------------------------------------
    def measure(self, inverse_scale: Optional[torch.Tensor], loss: torch.Tensor, noted: torch.Tensor,
                row: torch.Tensor) -> np.ndarray:
        """Read this step's gradients into ``row`` (see ``StepLayout``), ending with the step's ``loss``
        and the ``noted`` one; returns which layers had a gradient."""
        present = np.zeros(self.n_groups, dtype=bool)
        vectors: List[torch.Tensor] = []
        scalars: List[torch.Tensor] = []
        for b in self.buckets:
            present[b.measure(inverse_scale, self.layout.count, self.zero, vectors, scalars)] = True
        if any(b.device != self.device for b in self.buckets):  # a model over several devices: its figures meet here
            vectors, scalars = [v.to(self.device) for v in vectors], [v.to(self.device) for v in scalars]
        scalars += [loss, noted]
        if vectors:
            torch.cat(vectors + [torch.stack(scalars)], out=row)
        else:
            torch.stack(scalars, out=row)
        return present

    def flip(self) -> None:
        """The next step's sample goes to the other buffer (and is compared with this one's)."""
        for b in self.buckets:
            b.sample.flip()

    def reduce(self, row: torch.Tensor, extras: Extras, present: np.ndarray) -> distributed.Gathered:
        """The step's one collective, started and not waited for: SUM of squares, sums and counts, MAX of
        extremes."""
        summed, maxed = self.layout.for_reduce(row, extras, self._present_on_device(present))
        return distributed.Gathered(summed, maxed, self.ctx)

    def _present_on_device(self, present: np.ndarray) -> torch.Tensor:
        """Which groups had a gradient, as a device vector; made once while every group has one."""
        if not present.all():
            return torch.from_numpy(present.astype(np.float32)).to(self.device, non_blocking=True)  # no wait
        if self._all_present is None:
            self._all_present = torch.ones(self.n_groups, device=self.device)
        return self._all_present

    # -- the extras ---------------------------------------------------------------------------------
    def counts(self, maxima: np.ndarray) -> Extras:
        """On a CPU, where the step's ``maxima`` are on the host already: every tensor's inf/NaN count
        where one is not finite; under a process group zeros elsewhere (the ranks' layouts must agree)."""
        if not np.isfinite(maxima).all():
            return [("counts", torch.stack(b.count_nonfinite())) for b in self.buckets]
        if self.ctx is None:
            return []
        if self._no_counts is None:
            self._no_counts = [torch.zeros(len(b.params), dtype=torch.float64) for b in self.buckets]
        return [("counts", zeros) for zeros in self._no_counts]

    def histogram(self, counts: torch.Tensor) -> Extras:
        """Count the sample's |g| into ``counts``; the zeros each layer gained, and every tensor's sum."""
        extras: Extras = []
        for b in self.buckets:
            zeros = b.sample.count(counts) if b.counts_histogram else torch.zeros(self.n_groups, device=b.device)
            extras.append(("zeros", zeros))
        return extras + [("sums", b.sums()) for b in self.buckets]

    def update(self) -> Extras:
        """The update since the snapshot, with the norms of the weights it was made from (read first:
        the update overwrites the snapshot)."""
        base = [("update_base_sq", b.snapshot_sq()) for b in self.buckets]
        return base + [("update_sq", b.update_sq()) for b in self.buckets]

    def weights(self) -> Extras:
        """The weights' norms now (the first step's, before any snapshot)."""
        return [("weight_sq", b.weight_sq()) for b in self.buckets]

    def snapshot(self, exact: bool) -> Extras:
        """Copy the weights for the next update; ``exact``: also their norms (a step that copies every step)."""
        for b in self.buckets:
            b.take_snapshot()
        return [("weight_sq", b.snapshot_sq()) for b in self.buckets] if exact else []

    def clip_sums(self, watched: Watched, inverse_scale: Optional[torch.Tensor], dtype: torch.dtype) -> Extras:
        """The sums of the user's clipping by value or AGC (see ``gradscope.collect.clipping``)."""
        spec = watched.spec
        return [("clip", b.clip_sums(spec.method, spec.threshold, spec.eps, inverse_scale, watched.excluded, dtype))
                for b in self.buckets]

    # -- between observed steps, and at the end ------------------------------------------------------
    def joined(self, figure: Callable[[Bucket], torch.Tensor]) -> torch.Tensor:
        """One figure of every bucket, joined on the Monitor's device (in the layout's order)."""
        return torch.cat([figure(b).to(self.device) for b in self.buckets])

    def previous(self, inverse_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """For the step before an observed one: copy its sample and return each bucket's squared norm."""
        return torch.stack([b.previous(inverse_scale).to(self.device) for b in self.buckets])

    def release(self) -> None:
        for b in self.buckets:
            b.release()
