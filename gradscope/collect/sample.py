"""A bucket's flat float32 sample of its gradients, and the figures read off it.

Each step one ``_foreach_copy_`` writes a fixed sample of every gradient into one of two float32
buffers: all of a parameter under SAMPLE_MIN elements, and one block of SAMPLE_BLOCK elements in
``sample`` of a larger one, spread evenly over it. The buffers and every view into them are made once,
so a step builds no view but the large gradients' strided sources (their tensors are new each step).

Off the sample, each step: the whole parameters' norms and max |g|, exact (they sit whole in it), and
the two halves of the step-to-step dot product (this step's sample against the last). On the sampled
cadence: the |g| histogram and the whole parameters' sums. Whole parameters of one length, when at
least RUN_MIN of them share it, are one 2-D view reduced along its rows in one op; the rest are one
foreach op over their views, however many there are.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import segments
from ..analyse import histogram as hist

SAMPLE_MIN = 1 << 16  # parameters at least this large have their histogram and cosine sampled
SAMPLE_BLOCK = 1024
RUN_MIN = segments.RUN_MIN  # whole parameters of one length reduced as one 2-D view when this many share it


class _Views(NamedTuple):
    """The views of one buffer that a step reads: every parameter's slot, the runs (as |g| too), the
    other whole parameters (as |g| too), the two halves of the dot product, and the buffer's bits."""

    slots: List[torch.Tensor]
    runs: List[torch.Tensor]
    runs_abs: List[torch.Tensor]
    rest: List[torch.Tensor]
    rest_abs: List[torch.Tensor]
    head: torch.Tensor  # the sampled blocks of large parameters (weighted by ``sample`` in the dot)
    tail: torch.Tensor  # the whole parameters
    head_bits: torch.Tensor  # the same two parts as int32, for |g| (see _Magnitudes)
    tail_bits: torch.Tensor


class _Magnitudes:
    """|g| of the current buffer as float32 bits (the sign masked off), written at most once a step: of
    the whole parameters (what a CPU reads their max |g| off), and of the sampled blocks (for the
    histogram, which then turns the bits into bins in place)."""

    def __init__(self, size: int, weighted: int, device: torch.device) -> None:
        self.bits = torch.empty(size, dtype=torch.int32, device=device)
        self.parts = (self.bits[:weighted], self.bits[weighted:])  # the sampled blocks', the whole parameters'
        self.ready = 0  # how much of ``bits`` holds this step's |g|: nothing, the whole parameters (1), all (2)

    def fill(self, views: _Views, everything: bool) -> None:
        if self.ready < 1:
            torch.bitwise_and(views.tail_bits, hist.ABS_MASK, out=self.parts[1])
            self.ready = 1
        if everything and self.ready < 2:
            if self.parts[0].numel():
                torch.bitwise_and(views.head_bits, hist.ABS_MASK, out=self.parts[0])
            self.ready = 2


class _Bins(NamedTuple):
    """What turns the magnitudes into histogram bins: each element's group offset, and ones to add."""

    base: torch.Tensor  # per element: its group's first bin
    increments: torch.Tensor  # ones, expanded (no memory) to the sample's length


class Sample:
    """The sample of gradients of ``shapes`` (``histogram_only``: read no figure off it, only the histogram
    and the cosine, for a float64 bucket); ``groups`` numbers each parameter's layer, for the histogram's bins."""

    def __init__(self, shapes: Sequence[torch.Size], groups: Sequence[int], sample: int, device: torch.device,
                 histogram_only: bool) -> None:
        numels = [int(torch.Size(s).numel()) for s in shapes]
        self.sample = sample
        # per parameter: its count of SAMPLE_BLOCK blocks where it is sampled by block, 0 where it sits whole
        self.blocks = [n // SAMPLE_BLOCK if sample > 1 and n >= SAMPLE_MIN else 0 for n in numels]
        self.sizes = [len(range(0, r, sample)) * SAMPLE_BLOCK if r else n for n, r in zip(numels, self.blocks)]
        by_block = [i for i, r in enumerate(self.blocks) if r]
        whole = [i for i, r in enumerate(self.blocks) if not r]
        whole = [whole[k] for k in segments.order([self.sizes[i] for i in whole])]
        # Sampled blocks first (one region weighted by ``sample`` in the dot), then whole parameters, equal
        # sizes side by side so that each run of them is one view.
        starts, at = [0] * len(shapes), 0
        for i in by_block + whole:
            starts[i], at = at, at + self.sizes[i]
        self.weighted = sum(self.sizes[i] for i in by_block)
        # the parameters whose figures are read off the sample (where they sit whole), and a rank's empty shards
        self.off_sample = [] if histogram_only else [i for i in whole if self.sizes[i]]
        self.empty = [] if histogram_only else [i for i in whole if not self.sizes[i]]
        self.segments = segments.Segments([self.sizes[i] for i in self.off_sample], self.weighted, device)
        runs, rest = segments.split_runs([self.sizes[i] for i in self.off_sample])
        self.runs = [[self.off_sample[k] for k in run] for run in runs]
        self.rest = [self.off_sample[k] for k in rest]
        self.magnitudes = _Magnitudes(at, self.weighted, device)
        self.buffers = [torch.zeros(at, dtype=torch.float32, device=device) for _ in range(2)]
        self.views = [self._views(buf, starts, shapes) for buf in self.buffers]
        base = torch.empty(at, dtype=torch.int32)
        for i, g in enumerate(groups):  # each element's histogram bins start at its group's offset
            base[starts[i]:starts[i] + self.sizes[i]] = g * hist.N_BINS
        self.bins = _Bins(base.to(device), torch.ones(1, dtype=torch.int64, device=device).expand(at))
        self.current = 0

    def _views(self, buf: torch.Tensor, starts: List[int], shapes: Sequence[torch.Size]) -> _Views:
        magnitude = self.magnitudes.bits.view(torch.float32)
        # A whole parameter's slot has the gradient's own shape, so the copy needs no per-step reshape.
        slots = [buf[s:s + n].view((n // SAMPLE_BLOCK, SAMPLE_BLOCK) if r else shape)
                 for s, n, r, shape in zip(starts, self.sizes, self.blocks, shapes)]

        def run_view(flat: torch.Tensor, members: List[int]) -> torch.Tensor:
            s, n = starts[members[0]], self.sizes[members[0]]
            return flat[s:s + n * len(members)].view(len(members), n)

        def one(flat: torch.Tensor, i: int) -> torch.Tensor:
            return flat[starts[i]:starts[i] + self.sizes[i]]

        bits = buf.view(torch.int32)
        return _Views(slots, [run_view(buf, m) for m in self.runs], [run_view(magnitude, m) for m in self.runs],
                      [one(buf, i) for i in self.rest], [one(magnitude, i) for i in self.rest],
                      buf[:self.weighted], buf[self.weighted:], bits[:self.weighted], bits[self.weighted:])

    def source(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """The view of a gradient that the sample reads: whole, or every ``sample``-th block (one view op)."""
        blocks = self.blocks[i]
        if not blocks:
            return grad
        if not grad.is_contiguous():  # rare (a channels-last gradient): the blocks of its flat copy
            return grad.reshape(-1)[: blocks * SAMPLE_BLOCK].view(blocks, SAMPLE_BLOCK)[:: self.sample]
        return grad.as_strided((self.sizes[i] // SAMPLE_BLOCK, SAMPLE_BLOCK), (self.sample * SAMPLE_BLOCK, 1),
                               grad.storage_offset())

    def copy(self, index: List[int], grads: List[torch.Tensor], count: int,
             inverse_scale: Optional[torch.Tensor]) -> None:
        """Copy this step's gradients (those of parameters ``index``, of ``count``) into the current
        buffer; a parameter with no gradient reads as zeros."""
        slots = self.views[self.current].slots
        whole = len(index) == count
        if not whole:
            for i in set(range(count)) - set(index):
                slots[i].zero_()
        if grads:
            sources = [self.source(i, g) if self.blocks[i] else g for i, g in zip(index, grads)]
            torch._foreach_copy_(slots if whole else [slots[i] for i in index], sources)
        if inverse_scale is not None:
            buffer = self.buffers[self.current]
            buffer.mul_(inverse_scale.to(buffer.device))
        self.magnitudes.ready = 0

    def _magnitudes(self, everything: bool = False) -> None:
        """|g| of the current buffer (see _Magnitudes); ``everything``: of the sampled blocks too."""
        self.magnitudes.fill(self.views[self.current], everything)

    def run_figures(self, cpu: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The runs' norms and max |g|, one vector per run each, members in buffer order. A CPU reads the maxima off
        the magnitudes (see ``_Magnitudes``); an accelerator in one fused norm. NaN and inf carry through."""
        v = self.views[self.current]
        norms = [torch.linalg.vector_norm(r, 2, dim=1) for r in v.runs]
        if not cpu:
            return norms, [torch.linalg.vector_norm(r, float("inf"), dim=1) for r in v.runs]
        if v.runs:
            self._magnitudes()
        return norms, [r.amax(1) for r in v.runs_abs]

    def rest_views(self, magnitudes: bool) -> List[torch.Tensor]:
        """The views of the whole parameters outside the runs (``magnitudes``: of their |g|, see
        ``_magnitudes``), for the Bucket to reduce with the large ones in one foreach op."""
        v = self.views[self.current]
        if magnitudes and v.rest:
            self._magnitudes()
        return v.rest_abs if magnitudes else v.rest

    def dots(self, zero: torch.Tensor) -> List[torch.Tensor]:
        """This step's sample dotted with the last one's: the sampled blocks' part (to be weighted by
        ``sample``) and the whole parameters' part."""
        now, before = self.views[self.current], self.views[1 - self.current]
        head = torch.dot(now.head, before.head) if self.weighted else zero
        tail = torch.dot(now.tail, before.tail) if now.tail.numel() else zero
        return [head, tail]

    def flip(self) -> None:
        """The next step writes the other buffer (and compares with this one)."""
        self.current = 1 - self.current

    # -- the sampled cadence ------------------------------------------------------------------------
    def count(self, histogram: torch.Tensor) -> torch.Tensor:
        """Add the sample's |g| bins to ``histogram``; returns the zeros each group gained (sampled)."""
        self._magnitudes(everything=True)
        self.magnitudes.ready = 0  # the bits become bins
        bins = histogram.view(-1, hist.N_BINS)
        zeros_before = bins[:, 0].clone()
        bits, ones = self.magnitudes.bits, self.bins.increments
        bits.bitwise_right_shift_(hist.SHIFT).add_(self.bins.base)  # bin = top bits of |g| + group offset
        w = self.weighted
        _add_counts(histogram, bits[w:], ones[w:])
        if w:
            _add_counts(histogram, bits[:w], ones[:w])
        return bins[:, 0] - zeros_before

    def sums(self) -> torch.Tensor:
        """The whole parameters' sums (in ``off_sample`` order), exact, off the current buffer."""
        return self.segments.sum(self.buffers[self.current])

    def release(self) -> None:
        """Free the buffers (after ``Monitor.close``)."""
        self.buffers, self.views = [], []


def _add_counts(histogram: torch.Tensor, bins: torch.Tensor, ones: torch.Tensor) -> None:
    """Add one to ``histogram`` at each of ``bins``. A scatter into the running counts, except on a CPU
    with many elements per bin, where counting into a fresh vector and adding it is faster (an
    accelerator's ``bincount`` reads the largest bin back to the host first: a sync)."""
    if bins.device.type == "cpu" and histogram.numel() * 8 <= bins.numel():
        histogram.add_(torch.bincount(bins, minlength=histogram.numel()))
    else:
        histogram.index_add_(0, bins, ones)
