"""The profiler's hot path: per-layer gradient figures each observed step, moved to the host in batches.

``Monitor(model)`` groups parameters by their owning module. ``observe()`` is called after
``backward()`` and before clipping and ``optimizer.step()``; it reads the gradients the optimizer is
about to use, batches the arithmetic on the device and keeps one row of figures there. Every
``flush_every`` steps (and whenever a figure is asked for) the rows move to the host in one copy.
``profile()`` returns the plain :class:`~gradscope.analyse.profile.Profile` that the statistics are computed from.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import clipping, distributed, recorder
from .. import outputs
from ..analyse import histogram as hist
from .buckets import Bucket, agc_units
from .rows import HostCopy, HostRow, StepLayout, gather
from ..errors import ExperimentError
from ..run.experiment import is_adaptive
from .ledger import Ledger
from .layers import class_source, group_parameters, module_class, unwrap
from ..analyse.profile import Profile

MEASUREMENT = "pre-clip gradients, one observation per optimizer step (after backward, before clipping and step)"
MEASUREMENT_AMP = MEASUREMENT.replace("pre-clip gradients", "pre-clip gradients unscaled from the GradScaler's scale")
# Rows wait on the device this many steps before one copy moves them to the host. A sync drains the
# accelerator's launch queue, so syncing every step would stall a GPU step on the Monitor; 16 rows of a
# 1,000-layer model are about 1 MB of device memory, and a report, a figure read off an Observation or
# a GradScaler (which syncs each step itself) flushes at once, so nothing waits longer than it must.
FLUSH_EVERY = 16
# What a step between two observed ones (under ``every``) measures for the next observed one's row: the
# update of an observed step that took the weights' snapshot, and the previous step's squared norm (with
# its sample, for the cosine). Carried as extras (see gradscope.collect.rows).
BETWEEN = ("update_base_sq", "update_sq", "previous_norm_sq")
# Steps whose per-layer figures are kept whole before the first non-finite gradient: a ring of this many
# rows of three figures per layer (32 × 1,000 layers × 3 × 8 bytes = 768 kB), frozen at the failure.
NONFINITE_WINDOW = 32


class Monitor:
    """Observe a model's gradients in your own training loop.

    Call ``observe()`` once per optimizer step, after ``backward()`` and before clipping and
    ``optimizer.step()``; call ``report()`` at the end.

    What is exact and what is sampled: norms, max |g|, sums and non-finite counts use every element at
    every step. The |g| histogram (quantiles, kurtosis, zero fraction) and the step-to-step cosine read
    every element of parameters under 65,536 elements and one block of 1024 in ``histogram_sample`` of
    larger ones (1 reads every element); the histogram is counted every ``histogram_every`` steps.
    Weight norms and the update-to-weight ratio are read every ``update_every`` steps, the update as
    the change in the weights from that observation to the next one (or to ``report()`` for the last
    step); 1 reads them every step.

    When the figures reach the host: each step's stay on the device, and every ``flush_every`` steps
    they move in one copy, so a step in between never waits for the device. Reading a figure off an
    :class:`Observation`, ``report()``, ``profile()``, ``flush()`` and an enabled GradScaler flush at once.
    The figures are the same whatever ``flush_every`` is.

    ``optimizer``, when given, tells the report whether the optimizer keeps a second moment of the
    gradient (Adam's family), for which the advice arms the skip-step guard, as diagnose's does.

    ``nonfinite_window``: when a gradient or the global norm first goes non-finite, the report keeps the
    per-layer norms, max |g| and non-finite counts of that step and the ``nonfinite_window - 1`` before
    it, every one of them however long the run was (0 keeps none).

    ``clip``: how your loop clips, to report what it did over the run (see ``gradscope.collect.clipping``): a
    number (a norm threshold, as ``clip_grad_norm_(params, 1.0)`` or ``max_grad_norm``), a pair such as
    ``("value", 0.5)`` or ``("agc", 0.01)``, or the :class:`~gradscope.Clipper` that clips (whose guard's
    counts join the report). The Monitor still measures the gradients before clipping: the post-clip
    norm, the clip rate and, by value or AGC, the share capped and the cosine follow from them.

    ``output`` (a path; its suffix picks the format, as the callbacks' does) makes it a flight
    recorder: ``with Monitor(model, output="gradscope.json") as monitor:`` writes the report (under
    ``rules``) when the block ends, whole after a normal end and marked partial, with the reason and the
    last step, when the loop raised, was interrupted, or got SIGTERM (see ``gradscope.collect.recorder``).

    What it leaves on your model: it registers one gradient hook per parameter for the first backward
    only (to learn the backward order), and removes them at the first ``observe()`` or at ``close()``.
    It never changes weights, gradients, modes or ``requires_grad``. It keeps one copy of the weights
    and two float32 gradient samples (2/histogram_sample of the gradient's size, or less).
    """

    def __init__(self, model: nn.Module, *, parameters=None, accumulation_steps: int = 1, update_every: int = 4,
                 histogram_sample: int = 4, histogram_every: int = 4, history: int = 1024,
                 flush_every: int = FLUSH_EVERY, optimizer: Optional[torch.optim.Optimizer] = None,
                 output: Optional[Union[str, Path]] = None, rules=None, nonfinite_window: int = NONFINITE_WINDOW,
                 clip=None, every: int = 1) -> None:
        if min(update_every, histogram_sample, histogram_every, accumulation_steps, flush_every, every) < 1:
            raise ExperimentError("every, accumulation_steps, update_every, histogram_sample, histogram_every and "
                                  "flush_every must be at least 1", "1 measures (or flushes) every call or step")
        if not isinstance(nonfinite_window, int) or nonfinite_window < 0:
            raise ExperimentError(f"nonfinite_window must be a whole number of steps, not {nonfinite_window!r}",
                                  "pass 0 to keep no steps before a non-finite gradient, or a count such as 32")
        if output is not None:
            outputs.check(output, "report")  # a destination that cannot be written fails now, not at the end
        self.output, self.rules = output, rules
        self._sigterm = None
        self.model = model
        # what the report can say of the optimizer (whether it keeps a second moment; see the rules)
        self.adaptive_optimizer = None if optimizer is None else is_adaptive(optimizer)
        self.accumulation_steps = accumulation_steps
        self.every = every
        self._calls = 0
        self._optimizer_steps = 0  # optimizer steps seen, observed or not
        self._between: Dict[str, torch.Tensor] = {}  # what the steps between two observed ones measured for them
        tracked = None if parameters is None else {id(p) for p in parameters}
        inner = unwrap(model)  # name layers as the user did, not as a DDP or torch.compile wrapper does
        self._dist = distributed.context()
        self.layers, params, groups = group_parameters(inner, tracked)
        kept = [k for k, p in enumerate(params) if p.numel() > 0]  # a zero-element parameter has no gradient to read
        params, groups = [params[k] for k in kept], [groups[k] for k in kept]
        if not params:
            raise ExperimentError(
                f"{type(model).__name__} has no trainable parameters",
                "unfreeze some parameters (requires_grad=True) before profiling",
            )
        self._active = [i for i, layer in enumerate(self.layers) if layer.trainable_numel > 0]
        n_groups = len(self._active)
        self._group_index = {layer_i: k for k, layer_i in enumerate(self._active)}
        self.device = params[0].device
        by_key: "OrderedDict[tuple, Tuple[list, list]]" = OrderedDict()
        for p, g in zip(params, groups):
            entry = by_key.setdefault((p.device, p.dtype, distributed.is_sharded(p)), ([], []))
            entry[0].append(p)
            entry[1].append(self._group_index[g])
        self._buckets = [Bucket(ps, gs, key[0], histogram_sample, self._dist) for key, (ps, gs) in by_key.items()]
        self._sampled = np.zeros(n_groups)
        for b in self._buckets:
            np.add.at(self._sampled, b.groups, b.sampled)
        self.measurement = _measurement(MEASUREMENT, self._dist, any(b.sharded for b in self._buckets), every)
        self.update_every = update_every
        self._snapshot_step = -1
        self._n_groups = n_groups
        self._numel = np.array([self.layers[i].trainable_numel for i in self._active], dtype=np.float64)
        self._hist = torch.zeros(n_groups * hist.N_BINS, dtype=torch.int64, device=self.device)
        self._step_hist: Optional[torch.Tensor] = None  # one step's counts, under a GradScaler that may skip it
        self._all_present: Optional[torch.Tensor] = None
        # Each step's per-tensor figures, laid out in one vector. An accelerator (which cannot look at the
        # maxima without waiting) counts every step's inf and NaN; a CPU only where a max is not finite, and
        # under a process group (whose ranks must agree on the layout) sends zeros where it did not count.
        self._layout = StepLayout(self._buckets, n_groups, count=self.device.type != "cpu",
                                  world=self._dist.world if self._dist else 1)
        self._no_counts: Optional[List[torch.Tensor]] = None  # a CPU rank's counts where every max was finite
        self._zero = torch.zeros((), device=self.device)  # what a missing figure reads as
        self._to_host = HostCopy()
        self._ring: Optional[torch.Tensor] = None  # the rows of the steps waiting on the device (see _row)
        self._ring_rows: List[torch.Tensor] = []
        self._ring_host: Optional[np.ndarray] = None
        self._nan = torch.full((), float("nan"), device=self.device)  # a loss not given
        self.clip = clipping.parse(clip)
        self._clipper = clip if self.clip is not None and self.clip.source == "Clipper" else None
        self._clip_excluded, self._clip_capacity = self._clip_layout(inner, params)
        # everything kept on the host, step by step
        self._ledger = Ledger(self._numel, history, nonfinite_window, self.clip, self._clip_capacity)
        self.flush_every = flush_every
        self.histogram_every = histogram_every
        self._pending: List[_Pending] = []  # rows still on the device, oldest first
        self._seen_in_backward: set = set()
        self._pending_loss: Optional[torch.Tensor] = None
        self._sampled_all: Optional[np.ndarray] = None
        if self._dist is not None:  # now, while every rank is here: after a failure no collective is safe
            self._sampled_total()
        self._pending_count = 0
        self._backward_order: List[int] = []
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._order_hook(self._group_index[g]))
            for p, g in zip(params, groups) if not distributed.is_sharded(p)  # FSDP2 sets sharded grads itself
        ] if hasattr(torch.Tensor, "register_post_accumulate_grad_hook") else []

    def note_loss(self, loss: torch.Tensor) -> None:
        """Attribute a loss computed after the last observe() to that step (for loops that see it later).

        Losses noted between two observations are averaged; they reach the host with the next sync.
        """
        value = loss.detach().reshape(()).to(self.device, wide(self.device))
        self._pending_loss = value if self._pending_loss is None else self._pending_loss + value
        self._pending_count += 1

    def _take_pending_loss(self) -> torch.Tensor:
        """The mean of the losses noted since the last step, as a 0-d tensor (NaN when none was)."""
        if self._pending_loss is None:
            return self._nan
        mean = (self._pending_loss / self._pending_count).reshape(())
        self._pending_loss, self._pending_count = None, 0
        return mean

    @property
    def steps(self) -> int:
        """Optimizer steps observed so far."""
        return self._ledger.step + len(self._pending)  # recorded on the host, and waiting on the device

    # -- the hot path ---------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, loss: Optional[torch.Tensor] = None, *, scaler=None) -> "Observation":
        """Measure the current gradients as one optimizer step; pass ``loss`` to have it checked too.

        With ``accumulation_steps=k`` you may call it after every backward: only every k-th call, when
        the gradients hold the whole accumulated step, is measured (the losses of the others are averaged
        in); the calls between return ``{"measured": 0.0}``.
        Under mixed precision, pass the ``torch.amp.GradScaler``: gradients the scaler has not unscaled
        yet are divided by its scale (a power of two, so exactly), and a step with inf or NaN gradients
        is counted as skipped by the scaler, as the scaler will skip it, not as an explosion.

        Returns the step's :class:`Observation`: ``step``, ``global_norm``, ``loss``, ``nonfinite`` and
        ``skipped``. Its figures stay on the device until they are read (which moves every waiting
        step's to the host at once), the ``flush_every``-th step, or ``report()``; a loop that never
        reads them never waits for the device.
        """
        self._calls += 1
        if self.accumulation_steps > 1:
            if loss is not None:
                self.note_loss(loss)
            if self._calls % self.accumulation_steps:
                return Observation(None, self._optimizer_steps, {"step": self._optimizer_steps, "measured": 0.0})
            loss = self._take_pending_loss() if self._pending_loss is not None else None
        optimizer_step, self._optimizer_steps = self._optimizer_steps, self._optimizer_steps + 1
        if optimizer_step % self.every:
            return self._between_observed(optimizer_step, scaler)
        self._remove_hooks()
        dev, step = self.device, self.steps
        inverse_scale = _inverse_scale(scaler, dev)
        amp = scaler is not None and scaler.is_enabled()
        if amp:
            self.measurement = _measurement(MEASUREMENT_AMP, self._dist, any(b.sharded for b in self._buckets),
                                            self.every)
        counted = step % self.histogram_every == 0
        # The weights are copied on the step before every update_every-th (one op), and on that step the
        # copy's norms and the update since are read, with the histogram when the cadences agree (the
        # default); under ``every`` the step after the copy reads them, and this one carries them.
        measure = "update_sq" in self._between or (step > 0 and self._snapshot_step == optimizer_step - 1)
        snapshot = (step + 1) % self.update_every == 0
        present = np.zeros(self._n_groups, dtype=bool)
        vectors: List[torch.Tensor] = []
        scalars: List[torch.Tensor] = []
        for b in self._buckets:
            present[b.measure(inverse_scale, self._layout.count, self._zero, vectors, scalars)] = True
        if any(b.device != dev for b in self._buckets):  # a model over several devices: its figures meet here
            vectors, scalars = [v.to(dev) for v in vectors], [v.to(dev) for v in scalars]
        scalars += [self._loss_scalar(loss), self._noted_for_last()]
        row = self._row(len(self._pending))
        if vectors:
            torch.cat(vectors + [torch.stack(scalars)], out=row)
        else:
            torch.stack(scalars, out=row)
        extras = self._extras(row, optimizer_step, inverse_scale, amp, counted, measure, snapshot)
        for b in self._buckets:
            b.sample.flip()
        if self._dist is not None:  # one collective: SUM of squares, sums and counts, MAX of extremes
            summed, maxed = self._layout.for_reduce(row, extras, self._present_on_device(present))
            tensors = list(distributed.reduce_step(summed, maxed, self._dist))
        else:
            tensors = [row] + [t for _, t in extras]
        result = Observation(self, optimizer_step)
        self._pending.append(_Pending(optimizer_step, tensors, [(name, t.numel()) for name, t in extras], present,
                                      measure, loss is not None, amp, counted, result))
        if amp or len(self._pending) >= self.flush_every:  # a GradScaler syncs every step anyway
            self.flush()
        return result

    def _extras(self, row: torch.Tensor, step: int, inverse_scale: Optional[torch.Tensor], amp: bool, counted: bool,
                measure: bool, snapshot: bool) -> List[Tuple[str, torch.Tensor]]:
        """What a step adds to its row beyond the per-step figures (see ``gradscope.collect.rows.EXTRAS``):
        on the sampled cadence the histogram's zeros and the sums, the update and the weights; where a CPU
        saw a non-finite max, the counts; and the sums of the user's clipping by value or AGC."""
        extras: List[Tuple[str, torch.Tensor]] = [(name, self._between.pop(name)) for name in BETWEEN
                                                  if name in self._between]
        if not self._layout.count:  # on a CPU the maxima are on the host already: reading them waits for nothing
            if not np.isfinite(self._ring_host[len(self._pending)][self._layout.slots["max"]]).all():
                extras += [("counts", torch.stack(b.count_nonfinite())) for b in self._buckets]
            elif self._dist is not None:
                if self._no_counts is None:
                    self._no_counts = [torch.zeros(len(b.params), dtype=torch.float64) for b in self._buckets]
                extras += [("counts", zeros) for zeros in self._no_counts]
        if counted:
            histogram = self._hist if not amp else self._fresh_step_histogram()
            for b in self._buckets:
                zeros = b.sample.count(histogram) if b.counts_histogram else torch.zeros(self._n_groups, device=b.device)
                extras.append(("zeros", zeros))
            extras += [("sums", b.sums()) for b in self._buckets]
        if measure and not any(name == "update_sq" for name, _ in extras):
            extras += [("update_base_sq", b.snapshot_sq()) for b in self._buckets]  # before update_sq overwrites it
            extras += [("update_sq", b.update_sq()) for b in self._buckets]
        elif step == 0:  # the weights' norms from the first step on
            extras += [("weight_sq", b.weight_sq()) for b in self._buckets]
        if snapshot:
            for b in self._buckets:
                b.take_snapshot()
            self._snapshot_step = step
            if measure:  # every step copies (update_every=1): this step's own weights, exact
                extras += [("weight_sq", b.snapshot_sq()) for b in self._buckets]
        if self.clip is not None and self.clip.method in ("value", "agc"):  # the user's clipping, by element or unit
            extras += [("clip", b.clip_sums(self.clip.method, self.clip.threshold, self.clip.eps, inverse_scale,
                                            self._clip_excluded, row.dtype)) for b in self._buckets]
        return [(name, t if t.device == self.device else t.to(self.device)) for name, t in extras]

    def _row(self, k: int) -> torch.Tensor:
        """The device row for the ``k``-th step waiting: rows of the layout's width, made once, so that a
        step writes its figures in place (and a CPU reads its maxima with no op)."""
        if self._ring is None or len(self._ring) < self.flush_every:
            self._ring = torch.empty(self.flush_every, self._layout.width, dtype=wide(self.device), device=self.device)
            self._ring_rows = list(self._ring.unbind(0))
            self._ring_host = self._ring.numpy() if self.device.type == "cpu" else None
        return self._ring_rows[k]

    def _between_observed(self, optimizer_step: int, scaler) -> "Observation":
        """A step that ``every`` leaves unobserved: nothing, except for its neighbours. The step after one
        that took the weights' snapshot measures that step's update (the optimizer has stepped since);
        the step before an observed one copies its sample and its norm, for the observed step's cosine
        with it. Losses noted since the last step belong to it: kept when it was observed, else dropped."""
        last_observed = (optimizer_step - 1) % self.every == 0
        noted = self._take_pending_loss()
        if last_observed and noted is not self._nan:
            self._between["noted"] = noted
        with torch.no_grad():
            if last_observed and self._snapshot_step == optimizer_step - 1:
                self._between["update_base_sq"] = torch.cat([b.snapshot_sq().to(self.device) for b in self._buckets])
                self._between["update_sq"] = torch.cat([b.update_sq().to(self.device) for b in self._buckets])
            if (optimizer_step + 1) % self.every == 0:
                inverse_scale = _inverse_scale(scaler, self.device)
                norms = [b.previous(inverse_scale) for b in self._buckets]
                self._between["previous_norm_sq"] = torch.stack([n.to(self.device) for n in norms])
        return Observation(None, optimizer_step, {"step": optimizer_step, "measured": 0.0})

    def _noted_for_last(self) -> torch.Tensor:
        """The losses noted for the last step observed (NaN when none were): those noted since, when it was
        the step just before; else what the step after it kept (see ``_between_observed``)."""
        noted = self._between.pop("noted", None)
        pending = self._take_pending_loss()
        if noted is not None:
            return noted
        return pending if self.every == 1 else self._nan

    def _loss_scalar(self, loss) -> torch.Tensor:
        """The step's loss as a 0-d tensor on the Monitor's device (NaN when none was given)."""
        if loss is None:
            return self._nan
        if not isinstance(loss, torch.Tensor):
            return torch.tensor(float(loss), device=self.device)
        if loss.dim():
            loss = loss.reshape(())
        return loss if loss.device == self.device else loss.to(self.device)

    def _clip_layout(self, inner: nn.Module, params: List[nn.Parameter]) -> Tuple[frozenset, float]:
        """The parameters the user's AGC leaves alone (a Clipper's excluded head), and what the clip sums
        count over: every element (value), or every unit AGC clips."""
        if self.clip is None or self.clip.method not in ("value", "agc"):
            return frozenset(), 0.0
        if self.clip.method == "value":
            return frozenset(), float(self._numel.sum())
        skipped = set()
        if self._clipper is not None:
            names = self._clipper._excluded(inner)
            skipped = {id(p) for name, m in inner.named_modules() if name in names for p in m.parameters(recurse=False)}
        units = sum(agc_units(p) for p in params if id(p) not in skipped)
        return frozenset(skipped), float(units)

    def _fresh_step_histogram(self) -> torch.Tensor:
        if self._step_hist is None:
            self._step_hist = torch.zeros_like(self._hist)
        return self._step_hist.zero_()

    def _present_on_device(self, present: np.ndarray) -> torch.Tensor:
        """Which groups had a gradient, as a device vector; made once while every group has one."""
        if not present.all():
            return torch.from_numpy(present.astype(np.float32)).to(self.device, non_blocking=True)  # no wait
        if self._all_present is None:
            self._all_present = torch.ones(self._n_groups, device=self.device)
        return self._all_present

    def flush(self) -> None:
        """Move every step still on the device to the host (one copy) and record it."""
        if not self._pending:
            return
        arrays = self._to_host([t for p in self._pending for t in p.tensors])
        at = 0
        while self._pending:
            p = self._pending[0]
            mine, at = arrays[at:at + len(p.tensors)], at + len(p.tensors)
            if self._dist is not None:
                values, present = self._layout.arrays_of_reduced(mine[0], mine[1], p.extras)
            else:
                values = self._layout.arrays_of_step(mine[0], gather([name for name, _ in p.extras], mine[1:]))
                present = p.present
            self._pending.pop(0)  # one leaves the device's queue as the ledger records it: steps holds
            p.result._values = self._record(p, self._layout.decode(values, present))
            p.result._monitor = None

    def _record(self, p: "_Pending", row: HostRow) -> Dict[str, float]:
        self._ledger.amend_loss(self._ledger.last_step, row.noted)
        if p.amp:
            if not np.isfinite(row.max_abs).all():
                return self._record_skip(p.step, row, p.measured)
            if p.counted:
                self._hist += self._step_hist
        zeros = row.sampled_zeros * self._numel / self._sampled_total() if p.counted else None  # scaled up
        return self._ledger.record(p.step, row, row.nonfinite, row.present, zeros, p.measured, p.loss_given,
                                   self._first_in_backward_order)

    def _record_skip(self, step: int, row: "HostRow", measured: bool) -> Dict[str, float]:
        """A step the GradScaler will skip: keep the previous step's update, and nothing of this one."""
        if self.every == 1:
            for b in self._buckets:
                b.sample.flip()  # the next step compares with the last step that counted
        return self._ledger.record_skip(step, row, measured)

    @torch.no_grad()
    def _record_last_update(self) -> None:
        """Measure the last step's update (made after the last observe), if that step took a snapshot."""
        waiting = self._between.pop("update_sq", None)  # measured by the step after, never observed since
        if waiting is not None:
            weights = self._between.pop("update_base_sq")
        elif self.steps == 0 or self._snapshot_step != self._optimizer_steps - 1:
            return
        else:
            weights = torch.cat([b.snapshot_sq().to(self.device) for b in self._buckets])
            waiting = torch.cat([b.update_sq(keep=True).to(self.device) for b in self._buckets])
        both = torch.cat([waiting, weights]).to(wide(self.device))
        if self._dist is not None:
            both = distributed.all_reduce_sum(both)
        change, weight = np.split(both.to(torch.float64).cpu().numpy(), 2)
        values = self._layout.per_layer(change)
        if values.any():  # all zero: report() came before the last optimizer.step(); keep waiting
            self._ledger.record_update(self._snapshot_step, values, self._layout.per_layer(weight))
            self._snapshot_step = -1  # the snapshot is spent

    # -- backward order, for naming the first non-finite layer ----------------------------------------
    def _order_hook(self, group: int):
        def hook(_param: torch.Tensor) -> None:
            if group not in self._seen_in_backward:
                self._seen_in_backward.add(group)
                self._backward_order.append(group)
        return hook

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _first_in_backward_order(self, mask: np.ndarray) -> str:
        order = self._backward_order or list(range(self._n_groups))[::-1]
        for g in order:
            if mask[g]:
                return self.layers[self._active[g]].name
        return self.layers[self._active[int(np.argmax(mask))]].name

    # -- results --------------------------------------------------------------------------------------
    def profile(self, *, alone: bool = False) -> Profile:
        """Everything measured so far, as plain data.

        ``alone``: take no collective, for a rank whose peers may be dead (after a failure under several
        ranks). The steps recorded are whole, as each was reduced over the ranks when it was observed; the
        histograms are this rank's sample, the last step's update is left out, and on an accelerator the
        steps still waiting on the device are dropped (their collective may never have completed).
        """
        return self._profile(alone, copy=True)

    def _profile(self, alone: bool, copy: bool) -> Profile:
        """``profile()``; ``copy=False`` gives the series as views of the store (for report(), which reads
        them at once: the statistics copy what they keep)."""
        if alone and self.device.type != "cpu":
            self._pending.clear()
        self.flush()
        if not alone:
            self._record_last_update()
        if self._pending_loss is not None:
            noted = float(self._take_pending_loss())
            if (self._optimizer_steps - 1) % self.every == 0:  # the last step was observed: the loss is its
                self._ledger.amend_loss(self._ledger.last_step, noted)
        if "noted" in self._between:
            self._ledger.amend_loss(self._ledger.last_step, float(self._between.pop("noted")))
        return Profile(
            layers=tuple(self.layers), active=tuple(self._active), **self._ledger.profile_fields(copy),
            histograms=self._histograms(alone),
            backward_order=tuple(self.layers[self._active[g]].name for g in self._backward_order),
            measurement=self.measurement, device=str(self.device),
            model_source=class_source(module_class(unwrap(self.model))),
            ranks=self._dist.world if self._dist else 1, sharded=any(b.sharded for b in self._buckets), every=self.every,
            adaptive_optimizer=self.adaptive_optimizer,
            clip=self._ledger.clip_record(self._clipper.counts() if self._clipper is not None else None),
        )

    def _histograms(self, alone: bool = False) -> np.ndarray:
        """Pooled |g| counts per layer, summed over ranks (this rank's only, ``alone``) and scaled up from the
        sample to every element."""
        counts = self._hist.clone()
        if self._dist is not None and not alone:
            counts = distributed.all_reduce_sum(counts)
        grid = counts.view(self._n_groups, hist.N_BINS).cpu().numpy()
        sampled = np.asarray(self._sampled, dtype=np.float64) if alone else self._sampled_total()
        return grid * (self._numel / np.maximum(sampled, 1))[:, None]

    def _sampled_total(self) -> np.ndarray:
        """Sampled elements per layer and step, over all ranks (a collective, computed once)."""
        if self._sampled_all is None:
            sampled = self._sampled
            if self._dist is not None:
                sampled = distributed.all_reduce_sum(torch.tensor(sampled, device=self.device)).cpu().numpy()
            self._sampled_all = np.asarray(sampled, dtype=np.float64)
        return self._sampled_all

    def report(self, rules=None, *, name: Optional[str] = None, stopped_reason: Optional[str] = None,
               alone: bool = False):
        """Statistics, findings and a recommendation for everything observed: a :class:`Report`
        (``stopped_reason`` marks it partial: why the run ended early; ``alone``: see ``profile``)."""
        from ..pipeline import build_report  # the analysis (rules, scipy) loads when a report is asked for
        # the Profile is read at once and dropped (the statistics copy what they keep): its series as views
        return build_report(self._profile(alone, copy=False), rules=rules, model_name=name or type(unwrap(self.model)).__name__,
                            stopped_reason=stopped_reason)

    def close(self) -> None:
        """Remove any hook still on the model and free the gradient copies (steps not yet on the host are kept)."""
        self._remove_hooks()
        self.flush()
        for b in self._buckets:
            b.release()

    def __enter__(self) -> "Monitor":
        if self.output is not None:
            self._sigterm = recorder.arm()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """Remove the hooks; with ``output``, write the report however the block ended (see
        ``gradscope.collect.recorder``): a failure to write it is one line on stderr, and the run's own
        exception goes on."""
        self._remove_hooks()
        previous, self._sigterm = self._sigterm, None
        if self.output is None:
            recorder.disarm(previous)
            return
        recorder.hold(previous)  # SIGTERM ignored from here, with no moment in which it would kill
        try:
            recorder.record(self, self.output, self.rules, exc_type, exc)
        except Exception as error:
            if exc_type is None:
                raise
            sys.stderr.write(f"gradscope: the report could not be written to {self.output}: {error}\n")
        finally:
            recorder.disarm(previous)


class _Pending(NamedTuple):
    """A step whose row is still on the device, with what the host knew when it was observed."""

    step: int  # the optimizer step
    tensors: List[torch.Tensor]  # the step's vector and its extras (under a process group: summed and maxed)
    extras: List[Tuple[str, int]]  # the extras' names and lengths, in order
    present: np.ndarray
    measured: bool
    loss_given: bool
    amp: bool
    counted: bool  # whether the step's |g| histogram (and so its zeros) was counted
    result: "Observation"


class Observation(Mapping):
    """One observed step's global figures, read like a dict: ``step``, ``global_norm``, ``loss``,
    ``nonfinite``, ``skipped`` and ``measured``.

    ``step`` is known at once. The others wait on the device until the Monitor flushes; reading one
    flushes it (a host sync), so read them only where you need them now.
    """

    def __init__(self, monitor: Optional[Monitor], step: int, values: Optional[Dict[str, float]] = None) -> None:
        self._monitor, self.step, self._values = monitor, step, values

    def _resolved(self) -> Dict[str, float]:
        if self._values is None:
            self._monitor.flush()
        return self._values

    def __getitem__(self, key: str) -> float:
        return self.step if key == "step" else self._resolved()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())

    def __repr__(self) -> str:
        if self._values is None:
            return f"Observation(step={self.step}, not yet on the host)"
        return f"Observation({self._values!r})"


def wide(device: torch.device) -> torch.dtype:
    """The widest float the device computes in: float64, except on Apple's MPS, which has none."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _measurement(base: str, ctx: Optional[distributed.Context], sharded: bool, every: int = 1) -> str:
    if every > 1:
        base = base.replace("one observation per optimizer step", f"one observation every {every} optimizer steps")
    if ctx is None:
        return base
    if sharded:
        return (f"{base}; sharded (DTensor) gradients measured per shard and reduced over {ctx.world} ranks "
                "(SUM of squares, sums and counts, MAX of extremes): the figures are global")
    return f"{base}; gradients averaged over {ctx.world} ranks by backward (DDP): the figures are global"


def _inverse_scale(scaler, device: torch.device) -> Optional[torch.Tensor]:
    """1/scale as a device tensor when ``scaler`` is enabled and has not unscaled the gradients yet.

    Reads the scaler's own scale tensor and per-optimizer stage, so it adds no host sync.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    states = getattr(scaler, "_per_optimizer_states", {})
    if any(getattr(state.get("stage"), "name", "") == "UNSCALED" for state in states.values()):
        return None
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # the scaler has not scaled any loss yet
        return None
    return (1.0 / scale.float()).reshape(()).to(device)


