"""The run's |g| histogram per layer, pooled over the counted steps on the device (see
:mod:`gradscope.analyse.histogram` for the bins), and the scale from the sample to every element."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import distributed
from ..analyse import histogram as hist


class PooledHistogram:
    """Counts of ``n_groups`` layers with ``numel`` elements each, of which ``sampled`` are counted per
    counted step on this rank (see :class:`~gradscope.collect.sample.Sample`)."""

    def __init__(self, numel: np.ndarray, sampled: np.ndarray, device: torch.device,
                 ctx: Optional[distributed.Context]) -> None:
        self.numel, self.sampled = numel, sampled
        self.counts = torch.zeros(len(numel) * hist.N_BINS, dtype=torch.int64, device=device)
        self._step: Optional[torch.Tensor] = None  # one step's counts, under a GradScaler that may skip it
        self._ctx = ctx
        self._sampled_all: Optional[np.ndarray] = None
        if ctx is not None:  # now, while every rank is here: after a failure no collective is safe
            self.sampled_total()

    def target(self, amp: bool) -> torch.Tensor:
        """The counts a step adds to: the run's, or (under a GradScaler) a step's own, kept apart until
        the host knows the scaler did not skip it (``commit``)."""
        if not amp:
            return self.counts
        if self._step is None:
            self._step = torch.zeros_like(self.counts)
        return self._step.zero_()

    def commit(self) -> None:
        """Add the step's own counts (under a GradScaler) to the run's."""
        self.counts += self._step

    def zeros(self, sampled_zeros: np.ndarray) -> np.ndarray:
        """A step's zero elements per layer, scaled up from the sample's zero bin to every element."""
        return sampled_zeros * self.numel / self.sampled_total()

    def sampled_total(self) -> np.ndarray:
        """Sampled elements per layer and step, over all ranks (a collective, computed once)."""
        if self._sampled_all is None:
            sampled = self.sampled
            if self._ctx is not None:
                device = self.counts.device
                sampled = distributed.all_reduce_sum(torch.tensor(sampled, device=device)).cpu().numpy()
            self._sampled_all = np.asarray(sampled, dtype=np.float64)
        return self._sampled_all

    def grid(self, alone: bool = False) -> np.ndarray:
        """Pooled |g| counts per layer, summed over ranks (this rank's only, ``alone``) and scaled up from the
        sample to every element."""
        counts = self.counts.clone()
        if self._ctx is not None and not alone:
            counts = distributed.all_reduce_sum(counts)
        grid = counts.view(len(self.numel), hist.N_BINS).cpu().numpy()
        sampled = np.asarray(self.sampled, dtype=np.float64) if alone else self.sampled_total()
        return grid * (self.numel / np.maximum(sampled, 1))[:, None]
