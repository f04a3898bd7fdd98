"""Trials: train from the profile's start at several global-norm thresholds and judge them on held-out batches.

This is the trial and error a person does by hand, run for real: every trial restores the same
weights, optimizer state and RNG state, replays the same training batches, and is scored on batches
it never trained on. :mod:`gradscope.judge` says what to try, what counts as unstable and who wins.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import judge
from .experiment import Batch, Experiment, forward_backward, held_out_losses, median_or_inf, optimizer_step
from .judge import Trial, TrialSet
from .state import restore

TRIAL_STEPS = 30  # steps per trial by default: the advice must not depend on how long the profile ran
HELD_OUT_BATCHES = 8
BUDGET = 4.0  # trials may train this many full trials' worth of steps; at the default 30 profiled steps
# diagnose then costs about 5x its profile (a trial step is a plain step, cheaper than a profiled one).
# Counted in steps, not seconds or profiled steps, so the advice is the same on a busy machine as on a
# quiet one, and whatever --steps the profile ran.
MOST_TRIALS = 8  # the search rarely wants more: decades first, then two half-decade steps
Progress = Callable[[int, int, str], None]


def run_trials(experiment: Experiment, start: Dict[str, Any], batches: Sequence[Batch], held_out: Sequence[Batch],
               reference: Trial, thresholds: Sequence[float], *, device: torch.device, profile_seconds: float,
               most: int = MOST_TRIALS, budget: float = BUDGET, seconds: Optional[float] = None,
               progress: Optional[Progress] = None, notes: Sequence[str] = (),
               reference_rerun: bool = False) -> TrialSet:
    """Trials at ``thresholds`` (loosest first) in the order judge.next_candidate gives, within the budget.

    ``budget`` counts the clipped trials' steps in trials' worth, so the same run gives the same advice
    anywhere and whatever ``--steps`` the profile ran (the unclipped reference is outside it: it is the
    profile itself at the trials' length or where the profile went non-finite within it, and trained for
    them otherwise, ``reference_rerun``);
    ``seconds`` optionally caps the wall-clock time as well, for users who trade confidence for time.
    """
    began = time.perf_counter()
    restore(experiment, start)
    start_held_out = median_or_inf(held_out_losses(experiment, held_out, device))
    reference = _judged(reference, start_held_out)
    trials: List[Trial] = []
    allowed = int(budget * len(batches))
    stopped = ""
    while True:
        threshold = judge.next_candidate(thresholds, trials, start_held_out, reference)
        if threshold is None:
            stopped = "the search had settled on its pick and the half-decade steps beside it"
            break
        if len(trials) >= most:
            stopped = f"--trials allows {most}"
            break
        if sum(len(t.losses) for t in trials) + len(batches) > allowed:
            stopped = (f"the budget of {allowed} trial steps ({budget:g} trials' worth) would run out; "
                       "raise it with --trial-budget")
            break
        longest = max((t.seconds for t in trials), default=0.0)
        if seconds is not None and trials and time.perf_counter() - began + longest > seconds:
            stopped = f"another trial would pass the {seconds:g} s limit (--trial-seconds)"
            break
        restore(experiment, start)
        trials.append(_judged(_trial(experiment, batches, held_out, threshold, device), start_held_out))
        if progress is not None:
            progress(len(trials), min(most, len(thresholds)), f"clip {threshold:g}")
    tried = {t.threshold for t in trials}
    untried = [c for c in thresholds if c not in tried]
    trials.sort(key=lambda t: -t.threshold)  # loosest first, as the lattice reads
    winner, reason = judge.choose(trials, start_held_out, reference) if trials else (
        None, "no trial fitted in the budget; raise it with --trial-budget")
    return TrialSet(steps=len(batches), start_held_out=start_held_out, reference=reference, trials=tuple(trials),
                    untried=tuple(untried), stopped=stopped, winner=winner, reason=reason,
                    seconds=time.perf_counter() - began, profile_seconds=profile_seconds, notes=tuple(notes),
                    reference_rerun=reference_rerun)


def run_reference(experiment: Experiment, start: Dict[str, Any], batches: Sequence[Batch], held_out: Sequence[Batch],
                  device: torch.device) -> Trial:
    """The unclipped run from the common start (unjudged: run_trials judges it against the start)."""
    restore(experiment, start)
    return _trial(experiment, batches, held_out, math.inf, device)


def _trial(experiment: Experiment, batches: Sequence[Batch], held_out: Sequence[Batch], threshold: float,
           device: torch.device) -> Trial:
    """Train on ``batches`` clipping at ``threshold``, stopping once it diverges; scored on ``held_out``."""
    began = time.perf_counter()
    params = [p for p in experiment.model.parameters() if p.requires_grad]
    losses: List[float] = []
    norms: List[float] = []
    for step, batch in enumerate(batches):
        loss = forward_backward(experiment, batch, step, device)
        norm = torch.nn.utils.clip_grad_norm_(params, threshold)
        wide = torch.float32 if loss.device.type == "mps" else torch.float64  # a float64 loss may pass float32's range
        value, norm_value = torch.stack([loss.detach().to(wide), norm.to(wide)]).tolist()  # one host sync
        losses.append(value)
        norms.append(norm_value)
        if not (math.isfinite(losses[-1]) and math.isfinite(norms[-1])) or judge.blew_up(losses) is not None:
            break  # diverged: the rest of the trial would teach nothing
        optimizer_step(experiment, step)
    finished = len(losses) == len(batches) and math.isfinite(losses[-1])
    per_batch = held_out_losses(experiment, held_out, device) if finished else ()
    held = median_or_inf(per_batch) if finished else math.inf
    return Trial(threshold, tuple(losses), tuple(norms), held, seconds=time.perf_counter() - began,
                 held_out_batches=per_batch)


def _judged(trial: Trial, start_held_out: float) -> Trial:
    verdict = judge.assess(trial.losses, trial.norms, trial.held_out, start_held_out)
    return dataclasses.replace(trial, unstable=verdict)
