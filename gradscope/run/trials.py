"""Trials: train from the profile's start at several global-norm thresholds, judged on held-out batches,
and carry the contenders on to longer horizons while their ranking is open (successive halving).

This is the trial and error a person does by hand, run for real: every trial starts from the same
weights, optimizer state and RNG state, trains on the same batches, and is scored on batches it never
trains on. Many thresholds train briefly (the first rung); the contenders go on, the horizon doubling,
continuing from where they stopped (their state is kept, at most ``TrialOptions.keep`` at once; one
whose state was let go is replayed from the start, and that is counted), until the ranking is settled
or the budget is spent. :mod:`gradscope.advise.judge` says what to try, what counts as unstable, who goes on
and who wins.

Under a process group (DDP, FSDP2) every rank runs the same trials on its slice of each batch, restarting
from its own copy of the same state (its shards under FSDP2); the figures the judge reads are averaged over
the ranks (:func:`agreed`), so every rank's schedule makes the same decisions.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..advise import judge
from ..advise.reasons import because
from ..collect import distributed
from ..errors import GradscopeError
from . import schedule
from .clipper import clip_norm_
from .experiment import (Batch, Experiment, forward_backward, held_out_losses, median_or_inf, next_batch,
                         optimizer_step)
from ..advise.judge import Checkpoint, Trial, TrialSet
from .options import TrialOptions
from .state import capture, nbytes, restore

HELD_OUT_BATCHES = 8


def agreed(values: Sequence[float], device: torch.device) -> List[float]:
    """Each value's mean over the ranks, the same on every rank; the values themselves when alone.

    Under a process group (DDP, FSDP2) every rank trains its slice of the global batch and judges on its slice
    of the held-out batches, so the mean is the global batch's figure, and every rank's schedule, fed the same
    figures, makes the same decisions: no rank can drift to another trial."""
    ctx = distributed.context()
    if ctx is None:
        return list(values)
    packed = torch.tensor(list(values), dtype=torch.float64, device=device)
    try:
        distributed.all_reduce_sum(packed)
    except RuntimeError as exc:  # a peer stopped (it left word why: see stopped) or the collective timed out
        raise _collective_failed(exc, ctx) from exc
    return (packed / ctx.world).tolist()


def _collective_failed(exc: RuntimeError, ctx: distributed.Context) -> GradscopeError:
    """One line for a collective of the trials that failed, naming the rank that stopped first where it left word."""
    peers = sorted(distributed.stopped_peers(ctx))
    why = f"rank {peers[0][1]} stopped first: {peers[0][2]}" if peers else \
        f"the trials' all-reduce failed: {str(exc).splitlines()[0]}"
    return GradscopeError(why, f"fix that rank's error; a rank that dies silently shows as a collective that "
                               f"fails or times out after ${distributed.TIMEOUT_ENV} seconds")


def same_on_every_rank(threshold: float, steps: int, device: torch.device) -> None:
    """Check, with one collective, that every rank is about to train the same threshold to the same step: the
    schedule decides from figures every rank shares, so a disagreement is a bug, stopped before it can hang."""
    ctx = distributed.context()
    if ctx is None:
        return
    mine = torch.tensor([threshold, steps, -threshold, -steps], dtype=torch.float64, device=device)
    try:
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    except RuntimeError as exc:
        raise _collective_failed(exc, ctx) from exc
    if mine[0] != -mine[2] or mine[1] != -mine[3]:
        raise GradscopeError(f"the ranks disagree on the next trial (clip at {threshold:g} to {steps} steps on rank "
                             f"{ctx.rank})", "report this as a bug in gradscope, with the ranks' logs")


def stopped(error: GradscopeError) -> None:
    """Leave word in the process group's store that this rank stopped inside the trials, and why, for the
    ranks left waiting in the next collective to name (a no-op alone)."""
    ctx = distributed.context()
    if ctx is not None:
        distributed.post_stopped(ctx, error.problem)


def held_out(experiment: Experiment, batches: Sequence[Batch], device: torch.device) -> Tuple[float, ...]:
    """The loss on each held-out batch, averaged over the ranks (see :func:`agreed`)."""
    return tuple(agreed(held_out_losses(experiment, batches, device), device))


class TrialBatches:
    """The batches the trials train on, by step, and the held-out batches, which they never train on.

    The first ``first`` steps and the held-out batches are the profile's first batches (so the profile
    can be the unclipped reference); later steps draw on from the stream, each batch drawn once and
    kept, so every trial trains on the same batch at the same step.
    """

    def __init__(self, seen: Sequence[Batch], stream: Iterator[Batch], first: int) -> None:
        self._stream = stream
        self._drawn: List[Batch] = list(seen[:first + HELD_OUT_BATCHES])
        while len(self._drawn) < first + HELD_OUT_BATCHES:
            self._drawn.append(next_batch(stream, len(self._drawn)))
        self.first = first
        self.held_out: List[Batch] = self._drawn[first:first + HELD_OUT_BATCHES]

    def train(self, step: int) -> Batch:
        index = step if step < self.first else step + HELD_OUT_BATCHES
        while len(self._drawn) <= index:
            self._drawn.append(next_batch(self._stream, len(self._drawn)))
        return self._drawn[index]

    def repeats(self) -> bool:
        """Whether a held-out batch is also a training batch (Experiment.batches repeats within the trials)."""
        trained = self._drawn[:self.first] + self._drawn[self.first + HELD_OUT_BATCHES:]
        return any(h is b for h in self.held_out for b in trained)


@dataclasses.dataclass
class _Run:
    """One threshold's trial while the trials run: its record so far and, while it may go on, its state."""

    threshold: float
    losses: List[float] = dataclasses.field(default_factory=list)
    norms: List[float] = dataclasses.field(default_factory=list)
    checkpoints: List[Checkpoint] = dataclasses.field(default_factory=list)
    state: Optional[Dict[str, Any]] = None  # the training state after its last step, while kept
    seconds: float = 0.0
    diverged: bool = False

    def trial(self) -> Trial:
        last = self.checkpoints[-1] if self.checkpoints else Checkpoint(len(self.losses), math.inf)
        held = math.inf if self.diverged else last.held_out
        batches = () if self.diverged else last.held_out_batches
        return Trial(self.threshold, tuple(self.losses), tuple(self.norms), held, seconds=self.seconds,
                     held_out_batches=batches, checkpoints=tuple(self.checkpoints))


class _Trials:
    """The runs of one diagnose, the steps they spent, and the states they keep."""

    def __init__(self, experiment: Experiment, start: Dict[str, Any], data: TrialBatches, options: TrialOptions,
                 device: torch.device, start_held_out: float, reference: Trial, began: float, most_steps: int) -> None:
        self.experiment, self.start, self.data, self.options, self.device = experiment, start, data, options, device
        self.start_held_out, self.reference, self.began = start_held_out, reference, began
        self.most_steps = most_steps
        self.runs: Dict[float, _Run] = {}
        self.spent = 0

    def judged(self) -> List[Trial]:
        return [_judged(r.trial(), self.start_held_out) for r in self.runs.values()]

    def cost(self, threshold: float, steps: int) -> int:
        """Steps it takes to bring ``threshold`` to ``steps``: the rest, or all of them when replayed."""
        run = self.runs.get(threshold)
        return steps if run is None or run.state is None else steps - len(run.losses)

    def advance(self, threshold: float, steps: int) -> None:
        """Train ``threshold`` on to ``steps`` from its kept state, or from the start (replaying the rungs it
        ran, held-out checkpoints included, so a replay is the run it replaces), then checkpoint it."""
        same_on_every_rank(threshold, steps, self.device)
        run = self.runs.setdefault(threshold, _Run(threshold))
        began = time.perf_counter()
        if run.state is None:  # never run, or its state was let go
            rungs = [c.steps for c in run.checkpoints]
            run.losses, run.norms, run.checkpoints, run.diverged = [], [], [], False
            restore(self.experiment, self.start)
        else:
            rungs = []
            restore(self.experiment, run.state)
        for end in [*rungs, steps]:
            self.spent += _train(self.experiment, self.data, run, end, self.device)
            if run.diverged:
                break
            per_batch = held_out(self.experiment, self.data.held_out, self.device)
            run.checkpoints.append(Checkpoint(end, median_or_inf(per_batch), per_batch))
        run.state = None
        run.seconds += time.perf_counter() - began
        if not run.diverged and not _judged(run.trial(), self.start_held_out).unstable:
            run.state = capture(self.experiment, to_cpu=self.options.keep_on_cpu)

    def out_of_time(self) -> bool:
        """Whether another trial as long as the longest so far would end past ``options.seconds``."""
        if self.options.seconds is None or not self.runs:
            return False
        longest = max(r.seconds for r in self.runs.values())
        late = time.perf_counter() - self.began + longest > self.options.seconds
        return agreed([float(late)], self.device)[0] > 0  # the clocks differ: late on any rank is late on all

    def keep(self, ahead: Sequence[float]) -> None:
        """Let go of every state but those of the contenders ``ahead`` (most needed first), at most
        ``options.keep`` of them (a trial that has just finished holds one more until this is called)."""
        wanted = set(ahead[:self.options.keep])
        for run in self.runs.values():
            if run.threshold not in wanted:
                run.state = None


def run_trials(experiment: Experiment, start: Dict[str, Any], data: TrialBatches, reference: Trial,
               thresholds: Sequence[float], options: TrialOptions, *, device: torch.device, profile_seconds: float,
               progress: Optional[schedule.Progress] = None, reference_rerun: bool = False,
               most_steps: int = schedule.MOST_STEPS) -> TrialSet:
    """Trials at ``thresholds`` (loosest first): the first rung's search, in the order judge.next_candidate
    gives, then, with the adaptive horizon, the contenders judge.promote names, rung after rung.

    ``options.budget`` counts the clipped trials' steps, so the same run gives the same advice anywhere
    and whatever ``--steps`` the profile ran (the unclipped reference is outside it: it is the profile
    itself at the first rung's length or where the profile went non-finite within it, and trained for
    them otherwise, ``reference_rerun``); ``options.seconds`` optionally caps the wall-clock time as well.
    ``most_steps`` caps the horizon: where the learning-rate schedule ends, a contender stops too.
    """
    began = time.perf_counter()
    restore(experiment, start)
    start_held_out = median_or_inf(held_out(experiment, data.held_out, device))
    reference = _judged(reference, start_held_out)
    work = _Trials(experiment, start, data, options, device, start_held_out, reference, began, most_steps)
    first = options.first_steps
    try:
        ended = schedule.run(work, thresholds, progress)
    except GradscopeError as exc:
        stopped(exc)  # the ranks left waiting in a collective name this one
        raise
    restore(experiment, start)
    trials = sorted(work.judged(), key=lambda t: -t.threshold)  # loosest first, as the lattice reads
    tried = {t.threshold for t in trials}
    untried = [c for c in thresholds if c not in tried]
    winner, reason = judge.ruling(trials, start_held_out, reference) if trials else (
        None, (because("no_trial_fitted"),))
    return TrialSet(steps=first, start_held_out=start_held_out, reference=reference, trials=tuple(trials),
                    untried=tuple(untried), stopped=ended, winner=winner, reason=reason,
                    seconds=time.perf_counter() - began, profile_seconds=profile_seconds,
                    reference_rerun=reference_rerun, spent_trials=work.spent, adaptive=options.adaptive,
                    state_bytes=nbytes(start), states_most=1 + options.keep + 1)


def run_reference(experiment: Experiment, start: Dict[str, Any], data: TrialBatches, steps: int,
                  device: torch.device) -> Trial:
    """The unclipped run from the common start for ``steps`` steps (unjudged: run_trials judges it)."""
    restore(experiment, start)
    run = _Run(math.inf)
    _train(experiment, data, run, steps, device)
    per_batch = () if run.diverged else held_out(experiment, data.held_out, device)
    return Trial(math.inf, tuple(run.losses), tuple(run.norms), median_or_inf(per_batch) if per_batch else math.inf,
                 held_out_batches=per_batch)


def _train(experiment: Experiment, data: TrialBatches, run: _Run, steps: int, device: torch.device) -> int:
    """Train ``run`` on from its last step to ``steps`` clipping at its threshold, stopping once it diverges;
    the steps trained."""
    params = [p for p in experiment.model.parameters() if p.requires_grad]
    first = len(run.losses)
    for step in range(first, steps):
        loss = forward_backward(experiment, data.train(step), step, device)
        norm = clip_norm_(params, run.threshold)  # torch's, and sparse gradients too
        if hasattr(norm, "full_tensor"):  # over FSDP2's DTensors: the global norm, replicated on every rank
            norm = norm.full_tensor()
        dtype = torch.float32 if loss.device.type == "mps" else torch.float64  # a float64 loss may pass float32's range
        value, norm_value = torch.stack([loss.detach().to(dtype), norm.to(dtype)]).tolist()  # one host sync
        value, norm_value = agreed([value, norm_value], device)  # the global batch's loss under a process group
        run.losses.append(value)
        run.norms.append(norm_value)
        if not (math.isfinite(value) and math.isfinite(norm_value)) or judge.blew_up(run.losses) is not None:
            run.diverged = True  # the rest of the trial would teach nothing
            return step + 1 - first
        optimizer_step(experiment, step)
    return steps - first


def _judged(trial: Trial, start_held_out: float) -> Trial:
    verdict = judge.assess(trial.losses, trial.norms, trial.held_out, start_held_out)
    return dataclasses.replace(trial, unstable=verdict)
