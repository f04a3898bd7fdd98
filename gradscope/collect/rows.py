"""One observed step's figures on their way to the host: where each sits, and how they become a layer's.

Each step the buckets' per-tensor figures (see :meth:`~gradscope.collect.buckets.Bucket.measure`) are
stacked on the device into one vector, laid out here by :class:`StepLayout`; a step on the sampled
cadence adds named vectors of its own (``Extras``). At a flush every waiting step's tensors move to the
host in one copy, and the host sums each tensor's figures into its layer's, in float64: a layer's
squared norm is the sum of its tensors' squared norms, its max |g| the largest of theirs. The result is
one :class:`HostRow` per step, what the ledger records. This module alone knows the layout.

Under a process group the vector is split before the step's one collective (see
``StepLayout.for_reduce``): the sums (squared norms, counts, dots, losses, the extras, which layers had a
gradient) are summed over ranks, the maxima maxed.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .buckets import Bucket
from .distributed import Gathered

# The extras a step on the sampled cadence may carry, each one vector per bucket:
# sums, weight_sq, update_sq and update_base_sq (per tensor, squared norms: the weights', the update's and
# those of the weights the update was made from),
# zeros (per layer: the histogram's zero bin's gain), clip (the 3 sums of the user's clipping, see
# gradscope.collect.clipping), counts (per tensor: inf and NaN, where a CPU found a non-finite max), and
# previous_norm_sq (the step before's squared norm, already weighted by the share, where it was not observed).
EXTRAS = ("sums", "weight_sq", "update_sq", "update_base_sq", "zeros", "clip", "counts", "previous_norm_sq")
Extras = List[Tuple[str, torch.Tensor]]


class HostRow:
    """One step's figures per layer on the host (arrays of the layers' count, float64)."""

    def __init__(self, *, norm_sq: np.ndarray, max_abs: np.ndarray, grad_sum: np.ndarray, weight_sq: np.ndarray,
                 update_sq: np.ndarray, sampled_zeros: np.ndarray, nonfinite: np.ndarray, dot: float, loss: float,
                 noted: float, clip: np.ndarray, present: Optional[np.ndarray],
                 previous_norm_sq: float = float("nan"), update_base_sq: Optional[np.ndarray] = None) -> None:
        self.norm_sq, self.max_abs, self.grad_sum = norm_sq, max_abs, grad_sum
        self.weight_sq, self.update_sq = weight_sq, update_sq
        self.sampled_zeros, self.nonfinite = sampled_zeros, nonfinite
        self.dot, self.loss, self.noted, self.clip, self.present = dot, loss, noted, clip, present
        self.previous_norm_sq = previous_norm_sq  # the step before's, where it was not observed (else NaN)
        self.update_base_sq = update_base_sq  # the weights the update was made from, where one is measured


class StepLayout:
    """Where each of a step's figures sits in its vector, for the Monitor's ``buckets`` over ``n_groups``
    layers; ``count``: every step carries each tensor's inf/NaN count (on an accelerator, or under a
    process group of ``world`` ranks), else only a step whose max |g| was not finite does (an extra)."""

    def __init__(self, buckets: Sequence[Bucket], n_groups: int, count: bool, world: int = 1) -> None:
        self.n_groups, self.count, self.world = n_groups, count, world
        sizes = [len(b.params) for b in buckets]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.groups = np.concatenate([b.groups for b in buckets])
        self.share = np.concatenate([np.full(n, b.share) for n, b in zip(sizes, buckets)])
        self.bucket_share = np.array([b.share for b in buckets])
        self.weighting = np.array([float(b.sample.sample) for b in buckets])  # the sampled blocks' weight in the dot
        T, B = len(self.groups), len(buckets)
        slots = {"norm": np.full(T, -1), "max": np.full(T, -1), "count": np.full(T, -1),
                 "head": np.full(B, -1), "tail": np.full(B, -1)}
        at = 0

        def place(kind: str, where, n: int) -> None:
            nonlocal at
            slots[kind][where] = np.arange(at, at + n)
            at += n

        for off, b in zip(offsets, buckets):  # the vectors first: the runs' norms, then their maxima
            for kind in ("norm", "max"):
                for members in b.sample.runs:
                    place(kind, off + np.asarray(members, dtype=np.int64), len(members))
        for k, (off, b) in enumerate(zip(offsets, buckets)):  # then the scalars
            rest, large, empty = (off + np.asarray(members, np.int64)
                                  for members in (b.sample.rest, b.off_grad, b.sample.empty))
            for kind in ("norm", "max"):
                for where in (rest, large, empty):
                    place(kind, where, len(where))
            place("head", [k], 1)
            place("tail", [k], 1)
            if count:
                place("count", off + np.arange(len(b.params)), len(b.params))
        self.loss_slot, self.noted_slot, self.width = at, at + 1, at + 2
        if not count:
            del slots["count"]
        placed = np.concatenate(list(slots.values()))
        if (placed < 0).any() or len(np.unique(placed)) != len(placed):  # every figure has one slot of its own
            raise RuntimeError("gradscope: the step layout left a figure without a slot of its own")
        self.slots = slots
        self._by_group = np.argsort(self.groups, kind="stable")  # for the maxima: the tensors layer by layer
        self._group_starts = np.searchsorted(self.groups[self._by_group], np.arange(n_groups))
        self.weight_sq = np.zeros(n_groups)  # the last weight norms read (they move slowly; read on the cadence)
        self._index: Optional[Dict[str, torch.Tensor]] = None  # the slots as device tensors, under a process group

    @property
    def reduced_width(self) -> int:
        """The length of a step's summed part under a process group, on a step with no extras."""
        T, B = len(self.groups), len(self.bucket_share)
        return T * (2 if self.count else 1) + 2 * B + 2 + self.n_groups

    # -- on the device ------------------------------------------------------------------------------
    def for_reduce(self, step: torch.Tensor, extras: Extras, present: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The step's summed part (squared norms, counts, dots, loss and noted loss, the extras, then
        ``present``) and its maxima, for the one collective of a step under a process group."""
        if self._index is None:
            self._index = {k: torch.as_tensor(v, device=step.device) for k, v in self.slots.items()}
        index = self._index
        norm = step.index_select(0, index["norm"])
        parts = [norm * norm] + ([step.index_select(0, index["count"])] if self.count else [])
        parts += [step.index_select(0, index["head"]), step.index_select(0, index["tail"]),
                  step[self.loss_slot:self.width]]
        parts += [t for _, t in extras] + [present]
        dtype = step.dtype
        return torch.cat([p.to(dtype) for p in parts]), step.index_select(0, index["max"])

    # -- on the host --------------------------------------------------------------------------------
    def decode(self, arrays: Dict[str, np.ndarray], present: Optional[np.ndarray] = None) -> HostRow:
        """A step's per-layer figures from its per-tensor ones: ``arrays`` holds ``norm_sq``, ``max``,
        ``count`` (if counted), ``head``, ``tail``, ``loss``, ``noted`` and the extras it carries, each
        summed over ranks where there are several."""
        G, per_layer = self.n_groups, self.per_layer
        counts = arrays.get("count", arrays.get("counts"))
        base = per_layer(arrays["update_base_sq"]) if "update_base_sq" in arrays else None
        if "weight_sq" in arrays:
            self.weight_sq = per_layer(arrays["weight_sq"])
        elif base is not None:  # the weights' norms are those of their last copy
            self.weight_sq = base
        bucket = lambda name: arrays[name].reshape(len(self.bucket_share), -1)  # noqa: E731
        ranks = 1.0 / self.world  # the losses are averaged over ranks
        return HostRow(
            norm_sq=per_layer(arrays["norm_sq"]),
            max_abs=np.maximum.reduceat(arrays["max"][self._by_group], self._group_starts),
            grad_sum=per_layer(arrays["sums"]) if "sums" in arrays else np.full(G, np.nan),
            weight_sq=self.weight_sq,
            update_sq=per_layer(arrays["update_sq"]) if "update_sq" in arrays else np.zeros(G),
            sampled_zeros=bucket("zeros").sum(0) if "zeros" in arrays else np.zeros(G),
            nonfinite=per_layer(counts) if counts is not None else np.zeros(G),
            dot=float(np.sum(self.bucket_share * (self.weighting * arrays["head"] + arrays["tail"]))),
            loss=float(arrays["loss"][0]) * ranks, noted=float(arrays["noted"][0]) * ranks,
            clip=(self.bucket_share[:, None] * bucket("clip")).sum(0) if "clip" in arrays else np.zeros(3),
            present=present,
            previous_norm_sq=float(arrays["previous_norm_sq"].sum()) if "previous_norm_sq" in arrays else np.nan,
            update_base_sq=base,
        )

    def per_layer(self, values: np.ndarray) -> np.ndarray:
        """Per-tensor figures (in parameter order) summed into their layers, each weighted by its bucket's
        share (1/world for a replicated one under a process group)."""
        return np.bincount(self.groups, values * self.share, minlength=self.n_groups)

    def arrays_of_step(self, step: np.ndarray, extras: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """A single process's step vector, as ``decode`` reads it (norms squared here, in float64)."""
        out = {"norm_sq": step[self.slots["norm"]] ** 2, "max": step[self.slots["max"]],
               "head": step[self.slots["head"]], "tail": step[self.slots["tail"]],
               "loss": step[self.loss_slot:self.loss_slot + 1], "noted": step[self.noted_slot:self.width]}
        if self.count:
            out["count"] = step[self.slots["count"]]
        out.update(extras)
        return out

    def arrays_of_reduced(self, summed: np.ndarray, maxed: np.ndarray,
                          extras: Sequence[Tuple[str, int]]) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        """A step reduced over ranks (see ``for_reduce``), as ``decode`` reads it, and which layers had a
        gradient on any rank; ``extras``: the names and lengths of the extras it carried, in order."""
        T, B = len(self.groups), len(self.bucket_share)
        lengths = [("norm_sq", T)] + ([("count", T)] if self.count else []) + [("head", B), ("tail", B),
                                                                                 ("loss", 1), ("noted", 1)]
        out: Dict[str, List[np.ndarray]] = {}
        at = 0
        for name, n in lengths + list(extras):
            out.setdefault(name, []).append(summed[at:at + n])
            at += n
        arrays = {name: np.concatenate(parts) for name, parts in out.items()}
        arrays["max"] = maxed
        return arrays, summed[at:at + self.n_groups] > 0


def gather(names: Sequence[str], arrays: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
    """Host copies of a step's extras (one per bucket and name, in order, named ``names``), joined by name."""
    out: Dict[str, List[np.ndarray]] = {}
    for name, array in zip(names, arrays):
        if name not in EXTRAS:  # a name decode() would not read: a figure measured and then lost
            raise RuntimeError(f"gradscope: a step carried an extra this layout does not know: {name}")
        out.setdefault(name, []).append(array)
    return {name: np.concatenate(parts) for name, parts in out.items()}


class HostCopy:
    """Moves the waiting steps' tensors to the host in one copy, as float64 arrays: the only host sync of
    observing. On a CPU the join is written straight into a float64 buffer kept from flush to flush
    (grown when too short), whose numpy view is made once: no copy out and no conversion."""

    def __init__(self) -> None:
        self._buffer: Optional[torch.Tensor] = None
        self._array: Optional[np.ndarray] = None

    def __call__(self, tensors: List[torch.Tensor]) -> List[np.ndarray]:
        if not tensors:
            return []
        device = tensors[0].device
        flat = [t if t.dim() == 1 and t.device == device else t.reshape(-1).to(device) for t in tensors]
        total = sum(t.numel() for t in flat)
        if device.type == "cpu":
            if self._buffer is None or self._buffer.numel() < total:
                self._buffer = torch.empty(2 * total, dtype=torch.float64)  # room for flushes that carry more
                self._array = self._buffer.numpy()
            torch.cat(flat, out=self._buffer[:total])
            host = self._array[:total].copy()  # the buffer is written again at the next flush
        else:
            host = torch.cat(flat).cpu().numpy().astype(np.float64)
        return list(np.split(host, np.cumsum([t.numel() for t in flat])[:-1]))


class Waiting(NamedTuple):
    """A step whose row is still on the device, with what the host knew when it was observed."""

    step: int  # the optimizer step
    tensors: Union[List[torch.Tensor], Gathered]  # the step's vector and its extras; under a process group,
    # its collective in flight (the summed part and the maxima, once it ends)
    extras: List[Tuple[str, int]]  # the extras' names and lengths, in order
    present: Optional[np.ndarray]  # the layers that had a gradient (None under a process group: reduced with the row)
    measured: bool  # whether the row carries the update of the last step recorded
    loss_given: bool
    amp: bool
    counted: bool  # whether the step's |g| histogram (and so its zeros) was counted
    result: Any  # the step's Observation, filled in when the row reaches the host


class RowQueue:
    """The rows of the steps waiting on the device, oldest first, and the one host copy that moves them.

    Each row is a slice of a ring of ``capacity`` rows of ``width`` figures, made once, so that a step
    writes its figures in place; on a CPU the ring's numpy view lets the host read a row with no op.
    """

    def __init__(self, width: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        ring = torch.empty(capacity, width, dtype=dtype, device=device)
        self.capacity = capacity
        self.rows = list(ring.unbind(0))
        self.host = ring.numpy() if device.type == "cpu" else None
        self.waiting: List[Waiting] = []
        self._copy = HostCopy()

    def __len__(self) -> int:
        return len(self.waiting)

    def next_row(self) -> torch.Tensor:
        """The row the next step writes."""
        return self.rows[len(self.waiting)]

    def next_row_on_host(self) -> Optional[np.ndarray]:
        """The next step's row as the host sees it, once written (None off a CPU, where reading waits)."""
        return None if self.host is None else self.host[len(self.waiting)]

    def append(self, step: Waiting) -> bool:
        """Queue a step; whether the queue is full (time to flush)."""
        self.waiting.append(step)
        return len(self.waiting) >= self.capacity

    def drain(self) -> Iterator[Tuple[Waiting, List[np.ndarray]]]:
        """Every waiting step with its tensors' host copies, oldest first: one copy for all of them. Each
        leaves the queue as it is handed out, so that a count of steps (recorded + waiting) holds."""
        if not self.waiting:
            return
        tensors = [_tensors(w) for w in self.waiting]  # a step's collective is waited for here
        arrays = self._copy([t for ts in tensors for t in ts])
        at = 0
        for ts in tensors:
            step = self.waiting.pop(0)
            yield step, arrays[at:at + len(ts)]
            at += len(ts)

    def settle(self, device: torch.device, wait_s: float = 2.0) -> None:
        """For a rank alone after a failure: keep the waiting steps whose collectives ended well, waiting
        at most ``wait_s`` in all for those in flight, and drop the rest, from the first that did not (a
        peer may be gone); on an accelerator drop them all, since the device itself may be what failed."""
        kept = 0
        if device.type == "cpu":
            deadline = time.monotonic() + wait_s
            for w in self.waiting:
                if isinstance(w.tensors, Gathered) and not w.tensors.settled(deadline - time.monotonic()):
                    break
                kept += 1
        del self.waiting[kept:]


def _tensors(step: Waiting) -> List[torch.Tensor]:
    return list(step.tensors.result()) if isinstance(step.tensors, Gathered) else step.tensors
