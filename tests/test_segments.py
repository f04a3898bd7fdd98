"""Per-slice reductions over a flat buffer against the obvious per-tensor references."""
from __future__ import annotations

import pytest
import torch

from gradscope.collect.segments import Segments, order


def laid_out(lengths, seed=0, start=5):
    """A flat buffer with ``start`` padding elements, then slices of ``lengths`` in :func:`order`'s order."""
    g = torch.Generator().manual_seed(seed)
    ordered = [lengths[i] for i in order(lengths)]
    flat = torch.randn(start + sum(ordered) + 3, generator=g)
    slices, at = [], start
    for n in ordered:
        slices.append(flat[at:at + n])
        at += n
    return flat, Segments(ordered, start, flat.device), slices


@pytest.mark.parametrize("lengths", [
    [64, 4096, 64, 64, 4096, 1],          # runs of two lengths and one length of its own
    [7, 3, 11, 5],                        # every length its own: all in the scattered tail
    [16, 16, 16],                         # one run
    [70_000, 3, 3, 5, 9],                 # a large slice alone, a run, and a scattered tail
    [1],
])
def test_sums_match_each_slice(lengths):
    flat, seg, slices = laid_out(lengths)
    assert torch.allclose(seg.sum(flat), torch.stack([s.sum() for s in slices]), rtol=1e-5, atol=1e-5)


def test_repeated_lengths_come_first_longest_first():
    lengths = [3, 8, 3, 5, 8, 8, 2]
    assert [lengths[i] for i in order(lengths)] == [8, 8, 8, 3, 3, 5, 2]
    _, seg, _ = laid_out(lengths)
    assert [(n, length) for _, n, length in seg.runs] == [(3, 8), (2, 3)] and seg.ragged == 2


def test_a_large_slice_of_its_own_length_is_reduced_alone_not_scattered():
    """The scatter needs an index entry per element; a large slice would make that index large."""
    lengths = [5, 100_000, 7]
    assert [lengths[i] for i in order(lengths)] == [100_000, 7, 5]
    _, seg, _ = laid_out(lengths)
    assert [(n, length) for _, n, length in seg.runs] == [(1, 100_000)] and seg.ragged_index.numel() == 12


@pytest.mark.parametrize("lengths", [[64] * 70 + [5, 9, 9, 300], [3, 8, 3, 5], [16] * 64])
def test_norms_of_runs_and_the_rest_land_where_asked(lengths):
    """Runs of 64 or more equal lengths as 2-D views, the rest in one foreach norm; each squared norm at
    its slice's place, whatever the buffer's order."""
    from gradscope.collect.segments import Norms
    ordered = order(lengths)
    flat = torch.randn(sum(lengths), generator=torch.Generator().manual_seed(1))
    starts, at = [], 0
    for i in ordered:
        starts.append(at)
        at += lengths[i]
    norms = Norms(flat, starts, [lengths[i] for i in ordered], ordered, None)
    assert len(norms.runs) == sum(1 for n in set(lengths) if lengths.count(n) >= 64)
    expected = torch.zeros(len(lengths))
    for start, i in zip(starts, ordered):
        expected[i] = (flat[start:start + lengths[i]] ** 2).sum()
    assert torch.allclose(norms.squares(), expected, rtol=1e-5)
