"""The profiler's hot path: per-layer gradient figures each observed step, moved to the host in batches.

The :class:`Observer` is the part of :class:`gradscope.Monitor` that runs inside the training loop, and it
writes nothing: it hands its figures on as a Profile (the Monitor, at the edge, makes the report and
writes it). ``Observer(model)`` groups parameters by their owning module. ``observe()`` is called after
``backward()`` and before clipping and ``optimizer.step()``; it reads the gradients the optimizer is
about to use, batches the arithmetic on the device and keeps one row of figures there. Every
``flush_every`` steps (and whenever a figure is asked for) the rows move to the host in one copy.
``profile()`` returns the plain :class:`~gradscope.analyse.profile.Profile` that the statistics are computed from.
"""
from __future__ import annotations

from typing import Dict, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from . import clipping, culprits, distributed, optimizers
from ..analyse.profile import Profile, SpikeSamples
from ..errors import ExperimentError
from .cadence import BETWEEN, Cadence
from .figures import StepFigures
from .layers import BackwardOrder, class_source, group_parameters, module_class, unwrap
from .ledger import Ledger
from .optimizers import is_adaptive
from .losses import Losses, widest_float
from .options import MonitorOptions
from .pooled import PooledHistogram
from .rows import Extras, HostRow, RowQueue, Waiting, gather

MEASUREMENT = "pre-clip gradients, one observation per optimizer step (after backward, before clipping and step)"
MEASUREMENT_AMP = MEASUREMENT.replace("pre-clip gradients", "pre-clip gradients unscaled from the GradScaler's scale")


class Observer:
    """The Monitor's hot path: ``observe()`` each optimizer step, ``profile()`` for everything observed.

    See :class:`gradscope.Monitor` for what it measures, when, and what it leaves on the model; the Monitor
    adds the report and the flight recorder to it, at the edge.
    """

    def __init__(self, model: nn.Module, options: Optional[MonitorOptions] = None, *, parameters=None,
                 optimizer: Optional[torch.optim.Optimizer] = None, clip=None, **short) -> None:
        options = MonitorOptions.of(options, short)
        self.model = model
        # what the report can say of the optimizer (whether it keeps a second moment, its configuration;
        # see the rules), read when a profile is taken
        self._optimizer = optimizer
        self._cadence = Cadence(every=options.every, accumulation_steps=options.accumulation_steps,
                                update_every=options.update_every, histogram_every=options.histogram_every)
        tracked = None if parameters is None else {id(p) for p in parameters}
        inner = unwrap(model)  # name layers as the user did, not as a DDP or torch.compile wrapper does
        self.layers, params, layer_of = group_parameters(inner, tracked)
        kept = [k for k, p in enumerate(params) if p.numel() > 0]  # a zero-element parameter has no gradient to read
        params, layer_of = [params[k] for k in kept], [layer_of[k] for k in kept]
        if not params:
            raise ExperimentError(
                f"{type(model).__name__} has no trainable parameters",
                "unfreeze some parameters (requires_grad=True) before profiling",
            )
        # the layers with trainable parameters: the groups every figure is per
        self._active = [i for i, layer in enumerate(self.layers) if layer.trainable_numel > 0]
        group_of = {layer_i: k for k, layer_i in enumerate(self._active)}
        groups = [group_of[i] for i in layer_of]
        self.device = params[0].device
        self._figures = StepFigures(params, groups, len(self._active), options.histogram_sample, distributed.context())
        self.measurement = _measurement(MEASUREMENT, self._figures.ctx, self._figures.sharded, options.every)
        numel = np.array([self.layers[i].trainable_numel for i in self._active], dtype=np.float64)
        self._hist = PooledHistogram(numel, self._figures.sampled(), self.device, self._figures.ctx)
        self._queue = RowQueue(self._figures.layout.width, options.flush_every, widest_float(self.device), self.device)
        self._losses = Losses(self.device)
        self._watched = clipping.watch(clip, inner, params)
        # everything kept on the host, step by step
        self._ledger = Ledger(numel, options.history, options.nonfinite_window, self._watched)
        # FSDP2 sets sharded gradients itself: no hook on those
        unsharded = [(p, g) for p, g in zip(params, groups) if not distributed.is_sharded(p)]
        self._order = BackwardOrder([p for p, _ in unsharded], [g for _, g in unsharded])

    # the options, as given
    every = property(lambda self: self._cadence.every)
    accumulation_steps = property(lambda self: self._cadence.accumulation_steps)
    update_every = property(lambda self: self._cadence.update_every)
    histogram_every = property(lambda self: self._cadence.histogram_every)
    flush_every = property(lambda self: self._queue.capacity)
    clip = property(lambda self: None if self._watched is None else self._watched.spec)
    adaptive_optimizer = property(lambda self: None if self._optimizer is None else is_adaptive(self._optimizer))

    def note_loss(self, loss: torch.Tensor) -> None:
        """Attribute a loss computed after the last observe() to that step (for loops that see it later).

        Losses noted between two observations are averaged; they reach the host with the next sync.
        """
        self._losses.note(loss)

    @property
    def steps(self) -> int:
        """Optimizer steps observed so far."""
        return self._ledger.step + len(self._queue)  # recorded on the host, and waiting on the device

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

        Returns the step's :class:`Observation`: ``step``, ``global_norm``, ``loss``, ``nonfinite``,
        ``skipped`` and ``spike_z`` (the global norm's spike score against the steps before it, NaN for
        the first 5; see :meth:`take_apart` for what to do at a spike). Its figures stay on the device until they are read (which moves every waiting
        step's to the host at once), the ``flush_every``-th step, or ``report()``; a loop that never
        reads them never waits for the device.
        """
        cadence = self._cadence
        if cadence.accumulation_steps > 1:
            if loss is not None:
                self._losses.note(loss)
            if not cadence.call():
                return Observation(None, cadence.optimizer_steps, {"step": cadence.optimizer_steps, "measured": 0.0})
            loss = self._losses.take() if self._losses.waiting else None
        optimizer_step, observed = cadence.next_step()
        if not observed:
            return self._between_observed(optimizer_step, scaler)
        self._order.remove()
        step = self.steps
        inverse_scale = _inverse_scale(scaler, self.device)
        amp = scaler is not None and scaler.is_enabled()
        if amp:
            self.measurement = _measurement(MEASUREMENT_AMP, self._figures.ctx, self._figures.sharded, cadence.every)
        row = self._queue.next_row()
        present = self._figures.measure(inverse_scale, self._losses.of_step(loss), self._noted_for_last(), row)
        measured = cadence.measures_update(step, optimizer_step)
        extras = self._extras(row, step, optimizer_step, inverse_scale, amp, measured)
        self._figures.flip()
        ctx = self._figures.ctx
        tensors = [row] + [t for _, t in extras] if ctx is None else self._figures.reduce(row, extras, present)
        result = Observation(self, optimizer_step)
        full = self._queue.append(Waiting(optimizer_step, tensors, [(name, t.numel()) for name, t in extras],
                                          present if ctx is None else None, measured, loss is not None, amp,
                                          cadence.counted(step), result))
        if amp or full:  # a GradScaler syncs every step anyway
            self.flush()
        return result

    def _extras(self, row: torch.Tensor, step: int, optimizer_step: int, inverse_scale: Optional[torch.Tensor],
                amp: bool, measured: bool) -> Extras:
        """What a step adds to its row beyond the per-step figures (see ``gradscope.collect.rows.EXTRAS``):
        what the step before measured for it; where a CPU saw a non-finite max, the counts; on the sampled
        cadences the histogram's zeros and the sums, the update and the weights; and the sums of the
        user's clipping by value or AGC."""
        figures, cadence = self._figures, self._cadence
        extras: Extras = [(name, cadence.carried.pop(name)) for name in BETWEEN if name in cadence.carried]
        carried_update = any(name == "update_sq" for name, _ in extras)
        maxima = self._queue.next_row_on_host()
        if maxima is not None:  # on a CPU the maxima are on the host already: reading them waits for nothing
            extras += figures.counts(maxima[figures.layout.slots["max"]])
        if cadence.counted(step):
            extras += figures.histogram(self._hist.target(amp))
        if measured and not carried_update:
            extras += figures.update()
        elif step == 0:  # the weights' norms from the first step on
            extras += figures.weights()
        if cadence.snapshots(step):
            extras += figures.snapshot(exact=measured)  # copying every step (update_every=1): this step's own
            cadence.took_snapshot(optimizer_step)
        if self._watched is not None and self._watched.on_device:  # the user's clipping, by element or unit
            extras += figures.clip_sums(self._watched, inverse_scale, row.dtype)
        return [(name, t if t.device == self.device else t.to(self.device)) for name, t in extras]

    def _between_observed(self, optimizer_step: int, scaler) -> "Observation":
        """A step that ``every`` leaves unobserved: nothing, except for its neighbours. The step after one
        that took the weights' snapshot measures that step's update (the optimizer has stepped since);
        the step before an observed one copies its sample and its norm, for the observed step's cosine
        with it. Losses noted since the last step belong to it: kept when it was observed, else dropped."""
        cadence, figures = self._cadence, self._figures
        noted = self._losses.take()
        if cadence.after_observed(optimizer_step) and noted is not self._losses.missing:
            cadence.carried["noted"] = noted
        with torch.no_grad():
            if cadence.follows_snapshot(optimizer_step):
                cadence.carried["update_base_sq"] = figures.joined(lambda b: b.snapshot_sq())
                cadence.carried["update_sq"] = figures.joined(lambda b: b.update_sq())
            if cadence.before_observed(optimizer_step):
                cadence.carried["previous_norm_sq"] = figures.previous(_inverse_scale(scaler, self.device))
        return Observation(None, optimizer_step, {"step": optimizer_step, "measured": 0.0})

    def _noted_for_last(self) -> torch.Tensor:
        """The losses noted for the last step observed (NaN when none were): those noted since, when it was
        the step just before; else what the step after it kept (see ``_between_observed``)."""
        noted = self._cadence.carried.pop("noted", None)
        pending = self._losses.take()
        if noted is not None:
            return noted
        return pending if self._cadence.every == 1 else self._losses.missing

    def flush(self) -> None:
        """Move every step still on the device to the host (one copy) and record it."""
        layout = self._figures.layout
        for waiting, arrays in self._queue.drain():
            if self._figures.ctx is not None:
                values, present = layout.arrays_of_reduced(arrays[0], arrays[1], waiting.extras)
            else:
                values = layout.arrays_of_step(arrays[0], gather([name for name, _ in waiting.extras], arrays[1:]))
                present = waiting.present
            waiting.result._resolve(self._record(waiting, layout.decode(values, present)))
        self._ledger.listener.flushed()

    def _record(self, waiting: Waiting, row: HostRow) -> Dict[str, float]:
        self._ledger.amend_loss(self._ledger.last_step, row.noted)
        if waiting.amp:
            if not np.isfinite(row.max_abs).all():
                return self._record_skip(waiting.step, row, waiting.measured)
            if waiting.counted:
                self._hist.commit()
        zeros = self._hist.zeros(row.sampled_zeros) if waiting.counted else None
        return self._ledger.record(waiting.step, row, row.nonfinite, row.present, zeros, waiting.measured,
                                   waiting.loss_given, self._first_in_backward_order)

    def _record_skip(self, step: int, row: "HostRow", measured: bool) -> Dict[str, float]:
        """A step the GradScaler will skip: keep the previous step's update, and nothing of this one."""
        if self._cadence.every == 1:
            self._figures.flip()  # the next step compares with the last step that counted
        return self._ledger.record_skip(step, row, measured)

    @torch.no_grad()
    def _record_last_update(self) -> None:
        """Measure the last step's update (made after the last observe), if that step took a snapshot."""
        cadence, figures = self._cadence, self._figures
        waiting = cadence.carried.pop("update_sq", None)  # measured by the step after, never observed since
        if waiting is not None:
            weights = cadence.carried.pop("update_base_sq")
        elif self.steps == 0 or not cadence.snapshot_pending:
            return
        else:
            weights = figures.joined(lambda b: b.snapshot_sq())
            waiting = figures.joined(lambda b: b.update_sq(keep=True))
        both = torch.cat([waiting, weights]).to(widest_float(self.device))
        if figures.ctx is not None:
            both = distributed.all_reduce_sum(both)
        change, weight = np.split(both.to(torch.float64).cpu().numpy(), 2)
        values = figures.layout.per_layer(change)
        if values.any():  # all zero: report() came before the last optimizer.step(); keep waiting
            self._ledger.record_update(cadence.snapshot_step, values, figures.layout.per_layer(weight))
            cadence.spent_snapshot()

    def take_apart(self, observed: "Observation", batch, loss_fn, previous=None) -> SpikeSamples:
        """Take the batch of the step just observed apart, sample by sample: each sample's gradient norm,
        loss and share of the batch gradient's squared norm, at the current weights (see
        :mod:`gradscope.collect.culprits`). Call it after ``observe()`` and before ``optimizer.step()``,
        where the step is a spike::

            out = monitor.observe(loss)
            if out["spike_z"] >= 6:  # reading it waits for the step's figures: a host sync
                monitor.take_apart(out, batch, loss_fn, previous=last_batch)  # loss_fn(model, batch) -> loss
            optimizer.step()
            last_batch = batch

        ``previous``, the batch of the step before, has its loss measured at the same weights: a batch far
        above it is the data's doing, not the weights' (without it, only a sample holding an inf or a NaN
        is named as the cause). The record joins the report's ``spikes`` and reads as diagnose's do. A step that is not taken apart
        costs nothing; one that is costs about a forward and backward pass of its batch (by torch.func), or
        one per sample where the model cannot be vmapped. Under a process group, the samples are this
        rank's."""
        model = unwrap(self.model)
        record = culprits.per_sample(model, batch, lambda b: loss_fn(model, b), step=observed.step,
                                     global_norm=observed["global_norm"], z=observed["spike_z"],
                                     why="spike" if np.isfinite(observed["global_norm"]) else "nonfinite",
                                     previous=previous)
        self._ledger.spikes.append(record)
        return record

    def _first_in_backward_order(self, mask: np.ndarray) -> str:
        """The layer first reached by backward among ``mask`` (groups): where a failure started."""
        return self.layers[self._active[self._order.first(mask, len(self._active))]].name

    # -- results --------------------------------------------------------------------------------------
    def profile(self, *, alone: bool = False) -> Profile:
        """Everything measured so far, as plain data.

        ``alone``: take no collective, for a rank whose peers may be dead (after a failure under several
        ranks). The steps recorded are whole, as each was reduced over the ranks; the histograms are this
        rank's sample, the last step's update is left out, and of the steps still waiting, those whose
        collective has not ended well are dropped (it may never end), and on an accelerator all of them.
        """
        return self._profile(alone, copy=True)

    def _profile(self, alone: bool, copy: bool) -> Profile:
        """``profile()``; ``copy=False`` gives the series as views of the store (for report(), which reads
        them at once: the statistics copy what they keep)."""
        if alone:
            self._queue.settle(self.device)
        self.flush()
        if not alone:
            self._record_last_update()
        if self._losses.waiting:
            noted = float(self._losses.take())
            if self._cadence.last_observed:  # the last step was observed: the loss is its
                self._ledger.amend_loss(self._ledger.last_step, noted)
        if "noted" in self._cadence.carried:
            self._ledger.amend_loss(self._ledger.last_step, float(self._cadence.carried.pop("noted")))
        return self._as_profile(alone, copy)

    def recorded(self) -> Profile:
        """What the host holds now, as a Profile, changing nothing: no flush, no collective, this rank's
        histogram sample, and the steps still on the device left out (the live log's findings read it
        mid-run, at a flush)."""
        return self._as_profile(alone=True, copy=False)

    def _as_profile(self, alone: bool, copy: bool) -> Profile:
        ctx, clipper = self._figures.ctx, None if self._watched is None else self._watched.clipper
        return Profile(
            layers=tuple(self.layers), active=tuple(self._active), **self._ledger.profile_fields(copy),
            histograms=self._hist.grid(alone),
            backward_order=tuple(self.layers[self._active[g]].name for g in self._order.order),
            measurement=self.measurement, device=str(self.device),
            model_source=class_source(module_class(unwrap(self.model))),
            ranks=ctx.world if ctx else 1, sharded=self._figures.sharded, every=self._cadence.every,
            adaptive_optimizer=self.adaptive_optimizer,
            optimizer=None if self._optimizer is None else
            optimizers.setup(self._optimizer, unwrap(self.model), self.layers, self._active),
            clip=self._ledger.clip_record(clipper.counts() if clipper is not None else None),
        )

    def close(self) -> None:
        """Remove any hook still on the model and free the gradient copies (steps not yet on the host are kept)."""
        self._order.remove()
        self.flush()
        self._figures.release()


class Observation(Mapping):
    """One observed step's global figures, read like a dict: ``step``, ``global_norm``, ``loss``,
    ``nonfinite``, ``skipped``, ``measured`` and ``spike_z``.

    ``step`` is known at once. The others wait on the device until the Monitor flushes; reading one
    flushes it (a host sync), so read them only where you need them now.
    """

    def __init__(self, monitor: Optional[Observer], step: int, values: Optional[Dict[str, float]] = None) -> None:
        self._monitor, self.step, self._values = monitor, step, values

    def _resolve(self, values: Dict[str, float]) -> None:
        """The step's figures reached the host (the Monitor's flush): keep them, and let go of the Monitor."""
        self._values, self._monitor = values, None

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


