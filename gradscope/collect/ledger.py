"""The host side of observing: what a Monitor keeps about each step once its figures reach the host.

:class:`Ledger` holds the running totals, the bounded per-step series, the spike trackers, the loss
bookkeeping and the step counter. It touches no tensor: :class:`~gradscope.collect.observer.Observer` measures on
the device, unpacks one :class:`~gradscope.collect.rows.HostRow` per step, and hands it here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .clipping import ClippingSummary, ClippingCounter, Watched
from .history import RecentSteps, SeriesStore, SpikeTracker
from ..analyse.profile import SpikeSamples

if TYPE_CHECKING:  # the row is unpacked by rows.py, which needs torch; the ledger does not
    from .rows import HostRow


class StepRecord(NamedTuple):
    """One step as it reached the host, for a listener (the live log, ``gradscope.live``): the optimizer
    step, each layer's pre-clip norm (in the order of the Monitor's active layers), the global norm, the
    loss (NaN where none came with the step: it may be noted later), the non-finite elements, the spike
    score, the user's clipping's post-clip norm and scale (NaN where it is not watched), and whether a
    GradScaler skipped the step (then only the loss is known). ``loss_given``: the loss came with the step,
    so a NaN there is the loss's own."""

    step: int
    grad_norm: np.ndarray
    global_norm: float
    loss: float
    loss_given: bool
    nonfinite: float
    spike_z: float
    post_clip_norm: float = float("nan")
    clip_scale: float = float("nan")
    amp_skipped: bool = False


class StepListener:
    """What a Ledger tells a listener, on the host: each step as it is recorded, a loss that arrived after
    its step, and the end of a flush (every step that was waiting is recorded)."""

    def step(self, record: StepRecord) -> None:
        """A step was recorded."""

    def loss(self, step: int, value: float) -> None:
        """The loss of ``step`` arrived after it was recorded."""

    def flushed(self) -> None:
        """Every step that waited on the device is recorded."""

    def end(self, closing: bool) -> None:
        """The Monitor made a report (``closing`` False: the run may go on) or was closed."""


class Ledger:
    """Per-step records of ``n_groups`` layers with ``numel`` elements each; the last ``recent`` steps'
    per-layer figures are kept whole, and frozen at the first step whose gradient or global norm is not
    finite (``before_nonfinite``)."""

    def __init__(self, numel: np.ndarray, history: int, recent: int = 0, clip: Optional[Watched] = None) -> None:
        n_groups = len(numel)
        self.numel = np.asarray(numel, dtype=np.float64)
        self.step = 0  # steps recorded
        self.last_step = -1  # the optimizer step of the last one (steps observed every N-th are N apart)
        self.series = SeriesStore(history)
        self.failures = Failures(recent, n_groups)
        self.clip = None if clip is None else ClippingCounter(clip.spec, clip.capacity)  # what the user's own clipping did
        self.layer_spikes = SpikeTracker(n_groups)
        self.global_spikes = SpikeTracker(1)
        self.update_max = np.full(n_groups, np.nan)
        self.totals = {"nonfinite": np.zeros(n_groups), "zeros": np.zeros(n_groups), "elements": np.zeros(n_groups)}
        self.grad_present = np.zeros(n_groups, dtype=np.int64)
        self._last_weight_norm: Optional[np.ndarray] = None
        self._last_global_norm = float("nan")
        self.spikes: List[SpikeSamples] = []  # steps taken apart sample by sample (Monitor.take_apart)
        self.listener = StepListener()  # told of each step on the host (the live log); by default no one

    def record(self, step: int, row: "HostRow", nonfinite: np.ndarray, present: np.ndarray,
               zeros: Optional[np.ndarray], measured: bool, loss_given: bool,
               first_of: Callable[[np.ndarray], str]) -> Dict[str, float]:
        """Optimizer step ``step``, observed. ``zeros`` is the estimated count of zero elements per layer
        (None on a step whose histogram was not counted: the zero fraction is read from counted steps),
        ``measured`` whether the row carries the update of the last step recorded, and ``first_of`` names
        the layer that went non-finite first among a mask of layers."""
        numel = self.numel
        norm_sq, grad_sum, weight_sq = row.norm_sq, row.grad_sum, row.weight_sq
        grad_norm, weight_norm = np.sqrt(norm_sq), np.sqrt(weight_sq)
        global_norm = float(np.sqrt(norm_sq.sum()))
        with np.errstate(divide="ignore", invalid="ignore"):
            before = np.sqrt(row.previous_norm_sq) if np.isfinite(row.previous_norm_sq) else self._last_global_norm
            # NaN where either gradient is all zero (a float division would raise): no direction to compare
            cosine = row.dot / (global_norm * before) if self.step > 0 and global_norm * before > 0 else np.nan
            grad_to_weight = np.where(weight_norm > 0, grad_norm / weight_norm, np.nan)
            mean = grad_sum / numel
            std = np.sqrt(np.maximum(norm_sq / numel - mean**2, 0.0))
        if measured:  # the update of the last step recorded, over the weights it was made from
            self.record_update(self.last_step, row.update_sq, row.update_base_sq)
        self.totals["nonfinite"] += nonfinite
        if zeros is not None:
            self.totals["zeros"] += zeros
            self.totals["elements"] += numel
        else:
            zeros = np.full(len(numel), np.nan)
        self.grad_present += present
        loss = row.loss
        self.failures.record(step, nonfinite, first_of, loss if loss_given else None)
        self.series.append(
            step, grad_norm=grad_norm, grad_abs_max=row.max_abs, grad_mean=mean, grad_std=std,
            weight_norm=weight_norm, grad_to_weight=grad_to_weight, zero_fraction=zeros / numel,
            nonfinite=nonfinite, update_ratio=np.full(len(numel), np.nan),
            global_norm=np.array(global_norm), cosine=np.array(cosine), loss=np.array(loss),
            **({} if self.clip is None else {"post_clip_norm": np.array(np.nan), "clip_cosine": np.array(np.nan)}),
        )
        self.failures.keep(step, global_norm, grad_norm, row.max_abs, nonfinite)
        self.layer_spikes.update(step, grad_norm)
        z = self.global_spikes.update(step, np.array([global_norm]))[0]
        effect = None
        if self.clip is not None:
            effect = self.clip.record(step, global_norm, row.clip, z)
            self.series.amend(step, "post_clip_norm", np.array(effect["post_clip_norm"]))
            self.series.amend(step, "clip_cosine", np.array(effect["clip_cosine"]))
        clipped = () if effect is None else (effect["post_clip_norm"], effect["clip_scale"])
        nonfinite_total = float(nonfinite.sum())
        self.listener.step(StepRecord(step, grad_norm, global_norm, float(loss), loss_given, nonfinite_total,
                                      float(z), *clipped))
        self._last_weight_norm, self._last_global_norm = weight_norm, global_norm
        self.step, self.last_step = self.step + 1, step
        return {"step": step, "global_norm": global_norm, "loss": float(loss), "nonfinite": nonfinite_total,
                "skipped": 0.0, "measured": 1.0, "spike_z": float(z)}

    def record_skip(self, step: int, row: "HostRow", measured: bool) -> Dict[str, float]:
        """A step the GradScaler will skip: keep the previous step's update, and nothing of this one."""
        if measured:
            self.record_update(self.last_step, row.update_sq, row.update_base_sq)
        self.failures.amp_skipped.append(step)
        self.step, self.last_step = self.step + 1, step
        self.listener.step(StepRecord(step, np.full(len(self.numel), np.nan), float("nan"), float(row.loss),
                                      bool(np.isfinite(row.loss)), 0.0, float("nan"), amp_skipped=True))
        return {"step": step, "global_norm": float("nan"), "loss": float(row.loss), "nonfinite": 0.0,
                "skipped": 1.0, "measured": 1.0, "spike_z": float("nan")}

    def record_update(self, step: int, update_sq: np.ndarray, weight_sq: Optional[np.ndarray] = None) -> None:
        """The update-to-weight ratio of ``step``, measured once a later call saw the new weights, over
        the weights it was made from (``weight_sq``; by default the last step's weight norms)."""
        weight_norm = self._last_weight_norm if weight_sq is None else np.sqrt(weight_sq)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(weight_norm > 0, np.sqrt(update_sq) / weight_norm, np.nan)
        self.series.amend(step, "update_ratio", ratio)
        self.update_max = np.fmax(self.update_max, ratio)

    def amend_loss(self, step: int, value: float) -> None:
        """A loss that arrived after its step was recorded (noted later, or averaged over accumulation)."""
        if step < 0 or np.isnan(value):
            return
        self.series.amend(step, "loss", np.array(value))
        self.failures.record_loss(step, value)
        self.listener.loss(step, float(value))

    def clip_record(self, guard: Optional[Dict[str, object]] = None) -> Optional[ClippingSummary]:
        """What the user's clipping did, with the Clipper's own counts where it clipped; None unwatched."""
        return None if self.clip is None else self.clip.record_of(guard)

    def profile_fields(self, copy: bool = True) -> Dict[str, object]:
        """The Profile's fields that this ledger owns, as copies (``copy=False``: the series as views,
        for a Profile used at once and dropped)."""
        s = self.series
        return dict(
            steps=self.step, series_steps=np.array(s.steps, dtype=np.int64),
            series={name: s.array(name, copy) for name in s.fields},
            nonfinite_total=self.totals["nonfinite"].copy(), zero_total=self.totals["zeros"].copy(),
            elements_total=self.totals["elements"].copy(), grad_present_steps=self.grad_present.copy(),
            layer_spike_z=self.layer_spikes.max_z.copy(),
            global_spike_z=float(self.global_spikes.max_z[0]),
            global_spike_step=int(self.global_spikes.max_z_step[0]),
            update_ratio_max=self.update_max.copy(), **self.failures.profile_fields(), spikes=tuple(self.spikes),
        )


class Failures:
    """Where a run went non-finite: the steps whose gradient did, the first of them and the layer it
    started in, the first step whose loss did, the steps a GradScaler skipped, and the last ``recent``
    steps' per-layer figures (of ``n_groups`` layers), frozen at the first step whose gradient or global
    norm was not finite (the black box)."""

    def __init__(self, recent: int, n_groups: int) -> None:
        self.recent = RecentSteps(recent, n_groups)
        self.before_nonfinite: Optional[Dict[str, np.ndarray]] = None
        self.first_nonfinite: Optional[Tuple[int, str]] = None
        self.nonfinite_steps: List[int] = []
        self.amp_skipped: List[int] = []
        self.loss_nonfinite_step: Optional[int] = None

    def record(self, step: int, nonfinite: np.ndarray, first_of: Callable[[np.ndarray], str],
               loss: Optional[float]) -> None:
        """A step's non-finite counts per layer (``first_of`` names the first layer among a mask), and its
        loss (None where none was given)."""
        if nonfinite.any():
            self.nonfinite_steps.append(step)
            if self.first_nonfinite is None:
                self.first_nonfinite = (step, first_of(nonfinite > 0))
        if loss is not None:
            self.record_loss(step, loss)

    def record_loss(self, step: int, loss: float) -> None:
        if not np.isfinite(loss) and self.loss_nonfinite_step is None:
            self.loss_nonfinite_step = step

    def keep(self, step: int, global_norm: float, grad_norm: np.ndarray, max_abs: np.ndarray,
             nonfinite: np.ndarray) -> None:
        """Keep a step's figures in the black box, until the first step that went non-finite."""
        if self.before_nonfinite is None and self.recent.capacity:
            self.recent.append(step, global_norm, grad_norm=grad_norm, grad_abs_max=max_abs, nonfinite=nonfinite)
            if nonfinite.any() or not np.isfinite(global_norm):
                self.before_nonfinite = self.recent.snapshot()  # frozen at the first failure

    def profile_fields(self) -> Dict[str, object]:
        return dict(nonfinite_steps=tuple(self.nonfinite_steps), first_nonfinite=self.first_nonfinite,
                    loss_nonfinite_step=self.loss_nonfinite_step, amp_skipped_steps=tuple(self.amp_skipped),
                    before_nonfinite=self.before_nonfinite)
