"""Per-tensor sums and norms over tensors laid end to end in one flat buffer, in a few ops whatever
their count.

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
# Slices of one length reduced as one 2-D view when at least this many share it (see Norms). Below it they
# join one foreach op: a run is one op whatever its size, but every run adds one op to each call.
RUN_MIN = 64


def _scattered(length: int, count: Counter) -> bool:
    """Whether a slice is reduced in the scatter: small, and the only one of its length."""
    return count[length] == 1 and length < ALONE


def equal_neighbours(lengths: Sequence[int]) -> List[Tuple[int, int]]:
    """The groups of neighbouring slices of one length, as (first, past the last) positions."""
    groups, k = [], 0
    while k < len(lengths):
        j = k
        while j < len(lengths) and lengths[j] == lengths[k]:
            j += 1
        groups.append((k, j))
        k = j
    return groups


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
        for first, past in equal_neighbours(lengths):
            if _scattered(lengths[first], count):  # the scattered tail: every slice after it is too
                break
            self.runs.append((at, past - first, lengths[first]))
            at, k = at + (past - first) * lengths[first], past
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
        if not parts:  # no slices
            return torch.zeros(0, dtype=dtype, device=flat.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def split_runs(lengths: Sequence[int]) -> Tuple[List[List[int]], List[int]]:
    """Slices laid end to end (positions in buffer order) as runs of at least RUN_MIN neighbours of one
    length, each one 2-D view, and the rest."""
    runs: List[List[int]] = []
    rest: List[int] = []
    for first, past in equal_neighbours(lengths):
        if past - first >= RUN_MIN:
            runs.append(list(range(first, past)))
        else:
            rest.extend(range(first, past))
    return runs, rest


class Norms:
    """The 2-norms of fixed slices of one fixed flat buffer (``views``, in slice order, laid out by
    :func:`order`), in a handful of ops whatever their count: each run of RUN_MIN or more equal lengths
    as one 2-D view, the rest in one ``_foreach_norm``. ``squares()`` gives the squared norms with slice
    ``k``'s at position ``into[k]``; ``dtype``: the norms' (None: the buffer's), float32 for low precision."""

    def __init__(self, flat: torch.Tensor, starts: Sequence[int], lengths: Sequence[int],
                 into: Sequence[int], dtype: Optional[torch.dtype]) -> None:
        self.dtype = dtype
        runs, rest = split_runs(lengths)  # (the slices sit end to end: a run is one 2-D view)
        self.runs = [flat[starts[r[0]]:starts[r[0]] + len(r) * lengths[r[0]]].view(len(r), lengths[r[0]]) for r in runs]
        self.rest = [flat[starts[i]:starts[i] + lengths[i]] for i in rest]
        placed = [into[i] for i in [i for r in runs for i in r] + rest]  # where each computed norm goes
        self.reorder = None if placed == sorted(placed) else torch.tensor(
            sorted(range(len(placed)), key=placed.__getitem__), dtype=torch.int64, device=flat.device)

    def squares(self) -> torch.Tensor:
        """The squared norms, each at its place in ``into``."""
        parts = [torch.linalg.vector_norm(run, 2, dim=1, dtype=self.dtype) for run in self.runs]
        if self.rest:
            parts.append(torch.stack(torch._foreach_norm(self.rest, 2, dtype=self.dtype)))
        squares = (torch.cat(parts) if len(parts) > 1 else parts[0]).square()
        return squares if self.reorder is None else squares.index_select(0, self.reorder)
