"""Per-tensor sums over tensors laid end to end in one flat buffer, in a few ops whatever their count.

A Monitor copies hundreds of gradients into one buffer (see :mod:`~gradscope.collect.sample`), where they
are laid out in :func:`order`; reducing each slice with its own call costs a kernel launch (and
microseconds of Python) per tensor. Here the slices are ordered so that slices of
equal length sit side by side: each such run is one 2-D view, reduced along its rows in one op. Real
models repeat their blocks, so a 800-tensor model has a handful of distinct lengths. Small slices whose
length no other slice has are reduced together with one scatter over an element-to-slice index; a
large one is a run of its own (one op over many elements costs no more than its bandwidth).
"""
from __future__ import annotations

from collections import Counter
from typing import List, Optional, Sequence, Tuple

import torch


ALONE = 1 << 16  # a slice at least this long, with a length of its own, is reduced by itself


def _scattered(length: int, count: Counter) -> bool:
    """Whether a slice is reduced in the scatter: small, and the only one of its length."""
    return count[length] == 1 and length < ALONE


def order(lengths: Sequence[int]) -> List[int]:
    """The buffer order of slices of these lengths: runs of equal lengths (and large slices alone), longest
    first, then the small slices of a length of their own."""
    count = Counter(lengths)
    return sorted(range(len(lengths)), key=lambda i: (_scattered(lengths[i], count), -lengths[i], i))


class Segments:
    """Slices of ``lengths`` (in buffer order, as :func:`order` gives them) from ``start`` in a flat buffer."""

    def __init__(self, lengths: Sequence[int], start: int, device: torch.device) -> None:
        self.end = start + sum(lengths)
        self.runs: List[Tuple[int, int, int]] = []  # (offset, slices, length) of each run of equal lengths
        count = Counter(lengths)
        at, k = start, 0
        while k < len(lengths) and not _scattered(lengths[k], count):
            j = k
            while j < len(lengths) and lengths[j] == lengths[k]:
                j += 1
            self.runs.append((at, j - k, lengths[k]))
            at, k = at + (j - k) * lengths[k], j
        self.ragged_start, self.ragged = at, len(lengths) - k
        # the slice each element of the ragged tail belongs to (numbered within the tail)
        self.ragged_index = torch.repeat_interleave(
            torch.arange(self.ragged), torch.tensor(list(lengths[k:]), dtype=torch.int64)).to(device)

    def _views(self, flat: torch.Tensor):
        return [flat[at:at + n * length].view(n, length) for at, n, length in self.runs]

    def _tail(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.ragged_start:self.end]

    def sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Each slice's sum, in float32 (or the buffer's dtype if wider)."""
        dtype = torch.promote_types(flat.dtype, torch.float32)
        parts = [v.sum(1, dtype=dtype) for v in self._views(flat)]
        if self.ragged:
            parts.append(torch.zeros(self.ragged, dtype=dtype, device=flat.device)
                         .index_add_(0, self.ragged_index, self._tail(flat).to(dtype)))
        return self._cat(parts, flat)

    def _cat(self, parts: List[torch.Tensor], flat: torch.Tensor, empty: Optional[torch.dtype] = None) -> torch.Tensor:
        """The parts end to end; with no slices, an empty vector of ``empty`` (default: the sums' dtype)."""
        if not parts:
            return torch.zeros(0, dtype=empty or torch.promote_types(flat.dtype, torch.float32), device=flat.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)
