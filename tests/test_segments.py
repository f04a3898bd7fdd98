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
def test_sum_sum_sq_and_max_match_each_slice(lengths):
    flat, seg, slices = laid_out(lengths)
    assert torch.allclose(seg.sum(flat), torch.stack([s.sum() for s in slices]), rtol=1e-5, atol=1e-5)
    assert torch.allclose(seg.sum_sq(flat), torch.stack([(s * s).sum() for s in slices]), rtol=1e-5)
    magnitude = flat.abs()
    assert torch.equal(seg.max(magnitude), torch.stack([s.abs().max() for s in slices]))


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


def test_max_is_nan_or_inf_where_a_slice_holds_one():
    flat, seg, slices = laid_out([4, 4, 6, 9])
    slices[1][2] = float("nan")   # in a run
    slices[3][0] = float("inf")   # in the tail
    got = seg.max(flat.abs())
    assert torch.isnan(got[1]) and torch.isinf(got[3])
    assert torch.isfinite(got[0]) and torch.isfinite(got[2])


def test_count_nonfinite_counts_inf_and_nan_in_runs_and_in_the_tail():
    flat, seg, slices = laid_out([4, 4, 6, 9, 2])
    slices[0][[0, 3]] = float("nan")
    slices[1][1] = -float("inf")
    slices[4][0] = float("inf")  # in the scattered tail
    assert seg.count_nonfinite(flat).tolist() == [2, 1, 0, 0, 1]
