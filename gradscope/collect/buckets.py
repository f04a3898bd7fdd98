"""The device side of an observed step: parameters bucketed by device and dtype, and their arithmetic.

A Bucket reads each step's gradients in a fixed, small number of batched ops, whatever the number of
tensors: one ``_foreach_norm`` for the norms and, for max |g| of the large parameters, one fused
``_foreach_norm(inf)`` on an accelerator (on a CPU, one ``aminmax`` per large gradient), read off the
gradients; the whole parameters' figures off the flat sample (see
:mod:`~gradscope.collect.sample`), into which one ``_foreach_copy_`` writes them. Its per-step figures
are per tensor, as 0-d tensors and vectors that the Monitor stacks into one vector per step; the host
sums them per layer when the rows arrive (see :mod:`~gradscope.collect.rows`). The sums, the |g|
histogram and the weights are read on the sampled cadence.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import distributed, segments
from .sample import Sample

# A non-finite count multiplies gradients by 0 into a temporary: at most this many elements at a time.
COUNT_CHUNK = 1 << 25


class Bucket:
    """Trainable parameters sharing a device and dtype (``groups``: each one's layer), and their sample.

    Large parameters' figures (norm, max |g|, sum, non-finite count) are read off their gradients
    (``off_grad``); a whole parameter's off the sample, where it sits whole (``sample.off_sample``). A
    float64 bucket reads every figure off the gradients (its float32 sample could round or overflow).
    """

    def __init__(self, params: List[nn.Parameter], groups: List[int], device: torch.device, sample: int,
                 ctx: Optional[distributed.Context]) -> None:
        self.params = params
        self.groups = np.asarray(groups, dtype=np.int64)
        self.device = device
        # Under a process group: a sharded (DTensor) bucket's figures are summed over ranks as they are;
        # a replicated one's are the same on every rank, so each rank adds 1/world of them, and only
        # rank 0 counts its histogram.
        self.sharded = distributed.is_sharded(params[0])
        self.complex = params[0].is_complex()  # one dtype per bucket: all complex or none
        double = params[0].dtype in (torch.float64, torch.complex128)
        # norms accumulate in float32 at least (a float16 norm overflows at 65504); float64 stays float64
        self.norm_dtype = None if double else torch.float32
        self.share = 1.0 if ctx is None or self.sharded else 1.0 / ctx.world
        self.counts_histogram = ctx is None or self.sharded or ctx.rank == 0
        shapes = [distributed.local(p).shape for p in params]
        self.sample = Sample(shapes, groups, sample, device, histogram_only=double)
        self.off_grad = [i for i, r in enumerate(self.sample.blocks) if r or double]  # figures read off the gradient
        # a copy of the weights: their views into one flat buffer (in parameter order), and its norms
        self.snapshot: Optional[Tuple[List[torch.Tensor], segments.Norms]] = None
        self._sum_order: Optional[torch.Tensor] = None

    @property
    def sampled(self) -> List[int]:
        """Elements of each parameter counted in the histogram per counted step (0 where not counted)."""
        return self.sample.sizes if self.counts_histogram else [0] * len(self.params)

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

    def measure(self, inverse_scale: Optional[torch.Tensor], count: bool, zero: torch.Tensor,
                vectors: List[torch.Tensor], scalars: List[torch.Tensor]) -> np.ndarray:
        """Copy this step's gradients into the sample and append its per-tensor figures, in the order
        :class:`~gradscope.collect.rows.StepLayout` reads them: to ``vectors`` the runs' norms and maxima;
        to ``scalars`` the norms of the rest, of the large ones and of a rank's empty shards (zeros), their
        maxima in the same order, the two halves of the dot product with the last step, and with ``count``
        every parameter's
        inf/NaN count. ``zero``: a 0-d zero, for what has nothing to read. Returns the groups (layers)
        that had a gradient.
        """
        index, grads = self.gradients()
        present = self.groups if len(index) == len(self.params) else self.groups[index]
        self.sample.copy(index, grads, len(self.params), inverse_scale)
        cpu = self.device.type == "cpu"
        run_norms, run_max = self.sample.run_figures(cpu)
        vectors += run_norms + run_max
        full = self._full(index, grads, zero)
        large = [full[i] for i in self.off_grad]
        rest = len(self.sample.rest)
        whole = self.sample.rest_views(False)
        norms = self.norms(whole + large)
        tops = self.maxima(whole, self.sample.rest_views(True) if cpu else [], large)
        if inverse_scale is not None and large:  # the sample was unscaled in place; the gradients were not
            scale = inverse_scale.to(norms[0].device)
            norms = norms[:rest] + list(torch._foreach_mul(norms[rest:], scale))
            tops = tops[:rest] + list(torch._foreach_mul(tops[rest:], scale))
        empty = [zero] * len(self.sample.empty)
        scalars += norms + empty + tops + empty + self.sample.dots(zero)
        if count:
            scalars += self.count_nonfinite(full)
        return present

    def previous(self, inverse_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """For a step before an observed one (under ``Monitor(every=N)``): copy its sample, for the observed
        step's cosine with it, and return its squared norm (this rank's share of it), a 0-d tensor."""
        index, grads = self.gradients()
        self.sample.copy(index, grads, len(self.params), inverse_scale)
        self.sample.flip()
        if not grads:
            return torch.zeros((), device=self.device)
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=self.norm_dtype))
        if inverse_scale is not None:
            norms = norms * inverse_scale.to(norms.device)
        return (norms.double() if norms.device.type != "mps" else norms).square().sum() * self.share

    def _full(self, index: List[int], grads: List[torch.Tensor], zero: torch.Tensor) -> List[torch.Tensor]:
        """One gradient per parameter, in order: a 0-d zero where there is none this step, or where a
        rank's shard is empty (a fixed layout: every step's vector has the same slots)."""
        if len(index) == len(self.params) and not self.sharded:
            return grads
        full = [zero.to(grads[0].dtype) if grads else zero] * len(self.params)
        for i, g in zip(index, grads):
            if g.numel():
                full[i] = g
        return full

    def norms(self, views: List[torch.Tensor]) -> List[torch.Tensor]:
        """The 2-norms of ``views`` (the sample's whole parameters outside the runs, then the large
        gradients): one ``_foreach_norm``, the one pass over the gradients that the floor also makes."""
        return list(torch._foreach_norm(views, 2, dtype=self.norm_dtype)) if views else []

    def maxima(self, rest: List[torch.Tensor], rest_abs: List[torch.Tensor],
               large: List[torch.Tensor]) -> List[torch.Tensor]:
        """Max |g| of the sample's ``rest`` views and of the large gradients ``large``, in that order: one
        fused ``_foreach_norm(inf)`` on an accelerator. A CPU, where that runs many times slower, takes
        ``_foreach_max`` over the rest's magnitudes ``rest_abs`` and, of each large gradient, its least
        and greatest element in one pass (``aminmax``: no temporary the size of the gradient, as ``abs``
        would make); max |g| is the larger magnitude of the two, and a NaN carries through."""
        if not (rest or large):
            return []
        if (rest + large)[0].device.type != "cpu":
            return list(torch._foreach_norm(rest + large, float("inf"), dtype=self.norm_dtype))
        tops = list(torch._foreach_max(rest_abs)) if rest_abs else []
        if large:
            extremes = torch.stack([x for g in large for x in torch.aminmax(g)])  # least, greatest, ...
            tops += extremes.view(-1, 2).abs_().amax(1).unbind()
        return tops

    def count_nonfinite(self, full: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Every parameter's count of inf and NaN elements, exact (x * 0 is NaN exactly there, and the
        L0 norm counts it), COUNT_CHUNK elements at a time; in parameter order, as 0-d tensors."""
        if full is None:
            index, grads = self.gradients()
            zero = torch.zeros((), device=self.device)
            full = self._full(index, grads, zero)
        counts: List[torch.Tensor] = []
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        for a, b in _chunks([g.numel() for g in full], COUNT_CHUNK):
            counts += torch._foreach_norm(torch._foreach_mul(full[a:b], 0.0), 0, dtype=dtype)
        return counts

    def sums(self) -> torch.Tensor:
        """Each parameter's sum of gradient elements, exact, in parameter order (the whole ones off the
        sample, the large ones off their gradients); on the sampled cadence."""
        index, grads = self.gradients()
        full = self._full(index, grads, torch.zeros((), device=self.device))
        dtype = torch.float32 if self.norm_dtype is not None else torch.float64
        parts = [self.sample.sums().to(dtype)]
        if self.off_grad:
            parts.append(torch.stack([full[i].sum(dtype=dtype) for i in self.off_grad]))
        if self._sum_order is None:  # where each sum goes: the sample's whole parameters, then the large ones
            self._sum_order = torch.tensor(self.sample.off_sample + self.off_grad, dtype=torch.int64, device=self.device)
        out = torch.zeros(len(self.params), dtype=dtype, device=self.device)  # an empty shard sums to 0
        return out.index_copy_(0, self._sum_order, torch.cat(parts) if len(parts) > 1 else parts[0])

    def weights(self) -> List[torch.Tensor]:
        """The weights as the arithmetic reads them (under ``torch.no_grad``: the parameters themselves,
        with no per-step ``detach`` per tensor), this rank's part, complex ones as real pairs."""
        if not (self.sharded or self.complex):
            return self.params
        weights = [distributed.local(p.detach()) if self.sharded else p.detach() for p in self.params]
        return [torch.view_as_real(w) for w in weights] if self.complex else weights

    def update_sq(self, keep: bool = False) -> Optional[torch.Tensor]:
        """Each parameter's squared change since the snapshot, in parameter order (None without one);
        ``keep`` leaves the snapshot intact (at the cost of one allocation), else it is overwritten."""
        if self.snapshot is None:
            return None
        views, norms = self.snapshot
        if keep:
            change = torch._foreach_sub(self.weights(), views)
            return torch.stack(torch._foreach_norm(change, 2, dtype=self.norm_dtype)).float() ** 2
        torch._foreach_sub_(views, self.weights())
        return norms.squares()

    def take_snapshot(self) -> None:
        """Copy the weights (for the next step's update) into one flat buffer, laid out like the sample's
        whole parameters (equal sizes side by side), whose norms are then a handful of ops (see
        ``segments.Norms``): one ``_foreach_copy_``."""
        weights = self.weights()
        if self.snapshot is None:
            lengths = [w.numel() for w in weights]
            order = segments.order(lengths)
            flat = torch.empty(sum(lengths), dtype=weights[0].dtype, device=weights[0].device)
            views: List[Optional[torch.Tensor]] = [None] * len(weights)
            starts, at = [], 0
            for i in order:
                views[i] = flat[at:at + lengths[i]].view(weights[i].shape)
                starts.append(at)
                at += lengths[i]
            self.snapshot = (views, segments.Norms(flat, starts, [lengths[i] for i in order], order, self.norm_dtype))
        torch._foreach_copy_(self.snapshot[0], weights)

    def snapshot_sq(self) -> torch.Tensor:
        """The snapshot's squared weight norms, in parameter order (read before ``update_sq`` overwrites it)."""
        return self.snapshot[1].squares()

    def weight_sq(self) -> torch.Tensor:
        """The weights' squared norms now, in parameter order (the first step's, before any snapshot)."""
        return torch.stack(torch._foreach_norm(self.weights(), 2, dtype=self.norm_dtype)).float() ** 2

    def clip_sums(self, method: str, threshold: float, eps: float, inverse_scale: Optional[torch.Tensor],
                  excluded: frozenset, dtype: torch.dtype) -> torch.Tensor:
        """This bucket's sums of the user's clipping (see ``gradscope.collect.clipping``): the elements
        (value) or units (AGC, timm's ``adaptive_clip_grad``) capped, the post-clip squared norm, and the
        dot product of the clipped with the unclipped gradient; parameters in ``excluded`` (ids) are
        AGC's, left alone. Only when the user's loop clips that way; a fixed number of batched ops
        whatever the number of tensors, on the device, no wait."""
        index, grads = self.gradients()
        if not grads:
            return torch.zeros(3, dtype=dtype, device=self.device)
        if grads[0].dtype in (torch.float16, torch.bfloat16):
            grads = [g.float() for g in grads]
        if inverse_scale is not None:
            grads = torch._foreach_mul(grads, inverse_scale.to(grads[0].device))
        if method == "value":
            return _value_sums(grads, threshold, dtype)
        params = [distributed.local(self.params[i]).detach() for i in index]
        return _agc_sums(grads, params, [id(self.params[i]) in excluded for i in index], threshold, eps, dtype)

    def release(self) -> None:
        """Free the sample and the snapshot (after ``Monitor.close``)."""
        self.sample.release()
        self.snapshot = None


def _chunks(numels: List[int], budget: int) -> List[Tuple[int, int]]:
    """Consecutive ranges of tensors of at most ``budget`` elements each (a larger tensor alone)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(numels):
        if i > start and total + n > budget:
            out.append((start, i))
            start, total = i, 0
        total += n
    if start < len(numels):
        out.append((start, len(numels)))
    return out


def _readable(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as the arithmetic reads it: sparse ones made dense, complex ones as their magnitude |g|
    (so the 2-norm and max are those of the complex values, not of their real part)."""
    if grad.is_sparse:
        grad = grad.to_dense()
    if grad.is_complex():
        grad = grad.abs()
    return grad


def _squares(norms: List[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The sum of the squares of per-tensor norms (a ``_foreach_norm``'s result), in ``dtype``."""
    return torch.stack(norms).to(dtype).square().sum()


def _value_sums(grads: List[torch.Tensor], v: float, dtype: torch.dtype) -> torch.Tensor:
    """Clipping by value at ``v``: elements capped, post-clip squared norm, clipped-unclipped dot product.

    With a = |g|, c = min(a, v) and e = a - c (the excess, v short of a where capped): the post-clip
    squared norm is sum c^2, the dot product sum a*c = sum c^2 + v * sum e, and the elements capped are
    e's non-zeros. Three foreach norms (L2, L1, L0) over two lists; nothing is a difference of large sums
    (the post-clip norm of a gradient mostly capped is small: subtracted out of the pre-clip norm, it
    would be lost to rounding)."""
    a = torch._foreach_abs(grads)
    c = torch._foreach_clamp_max(a, v)
    post_sq = _squares(torch._foreach_norm(c), dtype)
    torch._foreach_sub_(a, c)
    excess = torch.stack(torch._foreach_norm(a, 1)).to(dtype).sum()
    capped = torch.stack(torch._foreach_norm(a, 0)).to(dtype).sum()
    return torch.stack([capped, post_sq, post_sq + v * excess])


def _unit_norms(tensors: List[torch.Tensor]) -> torch.Tensor:
    """timm's unitwise norms of every tensor, flattened in order: a bias or gain is one unit (its norm),
    a weight's rows are its units. Tensors of one shape are stacked and reduced in one op."""
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    vectors = [i for i, t in enumerate(tensors) if t.ndim <= 1]
    if vectors:
        for i, n in zip(vectors, torch._foreach_norm([tensors[i] for i in vectors])):
            out[i] = n.reshape(1)
    by_shape: dict = {}
    for i, t in enumerate(tensors):
        if t.ndim > 1:
            by_shape.setdefault(tuple(t.shape), []).append(i)
    for shape, members in by_shape.items():
        rows = torch.linalg.vector_norm(torch.stack([tensors[i] for i in members]), dim=tuple(range(2, len(shape) + 1)))
        for i, row in zip(members, rows):
            out[i] = row
    return torch.cat(out)


def _agc_sums(grads: List[torch.Tensor], weights: List[torch.Tensor], excluded: List[bool], factor: float,
              eps: float, dtype: torch.dtype) -> torch.Tensor:
    """AGC at ``factor`` (each unit's gradient capped at factor * max(|w_unit|, eps)): units capped, post-clip
    squared norm, clipped-unclipped dot product; ``excluded`` tensors are left alone."""
    weights = [w.float() if w.dtype in (torch.float16, torch.bfloat16) else w for w in weights]
    g_norm, w_norm = _unit_norms(grads).to(dtype), _unit_norms(weights).to(dtype)
    scale = (w_norm.clamp(min=eps) * factor / g_norm.clamp(min=1e-6)).clamp(max=1.0)
    if any(excluded):
        units = [1 if g.ndim <= 1 else g.shape[0] for g in grads]
        keep = torch.repeat_interleave(torch.tensor([not e for e in excluded], device=scale.device),
                                       torch.tensor(units, device=scale.device))
        scale = torch.where(keep, scale, torch.ones_like(scale))
    sq = g_norm.square()
    return torch.stack([(scale < 1).sum().to(dtype), (scale.square() * sq).sum(), (scale * sq).sum()])
