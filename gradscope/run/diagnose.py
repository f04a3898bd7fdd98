"""The diagnose pipeline: real training steps under a Monitor, then statistics → findings → trials → recommendation."""
from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from ..collect import distributed
from .. import interrupts
from ..errors import EXIT_INTERRUPTED, ExperimentError, GradscopeError
from .experiment import (Experiment, batch_stream, compute_loss, forward_backward, median_or_inf,
                         next_batch, optimizer_step, to_device)
from ..advise.judge import Trial, TrialSet, candidates, update_estimate
from ..advise.reasons import because
from ..collect.observer import Observer
from ..collect.optimizers import is_adaptive
from .options import ProfileOptions, TrialOptions
from ..pipeline import assess, build_report
from ..analyse.profile import Profile, TrialOutcome
from .rates import LOOK_AHEAD, ahead
from ..advise.recommend import method_for, recommend
from ..report import Report, ScheduleReach
from ..analyse.ruleset import RuleSet, load_rules
from .state import capture, restore as restore_state
from ..analyse.stats import rise
from .schedule import MOST_STEPS
from .spikes import SpikeWatch
from .trials import HELD_OUT_BATCHES, TrialBatches, held_out, run_reference, run_trials

DEFAULT_STEPS = 30
MAX_STEPS = 50
EXTEND = 4  # a profile that has seen nothing yet goes on, ``steps`` at a time, to at most this many times ``steps``
# ... while its loss has not fallen by this share (its last quarter against its first): a profile that has
# flagged nothing and shows no learning yet cannot tell a healthy run from a slow start. The same 1% as the
# trials' evidence floor (judge.SIGNAL), chosen apart: one is when to look longer, the other what counts.
EXTEND_UNLESS_FALLEN = 0.01
Progress = Callable[[int, int, Dict[str, float]], None]
TrialProgress = Callable[[int, int, str], None]


class Interrupted(GradscopeError):
    """Ctrl-C during profiling or trials; ``partial`` holds the report of what was done."""

    exit_code = EXIT_INTERRUPTED


def diagnose(
    experiment: Experiment,
    steps: int = DEFAULT_STEPS,
    rules: Union[None, str, Path, RuleSet] = None,
    *,
    seed: Optional[int] = None,
    profile: ProfileOptions = ProfileOptions(),
    trials: Union[TrialOptions, int] = TrialOptions(),
    progress: Optional[Progress] = None,
    trial_progress: Optional[TrialProgress] = None,
) -> Report:
    """Train ``experiment`` for ``steps`` optimizer steps, observing every step, and return a Report.

    A profile that has seen nothing yet (no warning or error, and a loss that has not fallen by 1%)
    goes on, ``steps`` at a time, to at most EXTEND x ``steps``: a run on a plateau can diverge right
    after it, and a loss that has not moved says nothing yet. ``profile`` (a
    :class:`~gradscope.run.options.ProfileOptions`) turns that off, picks the device, and says whether
    to put back what the profile touched (by default the model's weights and train/eval mode, the
    optimizer's state and the global RNG states are restored, so profiling leaves no trace).

    When a finding calls for norm clipping, thresholds are then tried for real from the same start, as
    ``trials`` (a :class:`~gradscope.run.options.TrialOptions`; a number N is ``TrialOptions(most=N)``, 0 none)
    says: by default every candidate trains 30 steps and the contenders go on, the horizon doubling,
    while their ranking is open, within 13 trials' worth of steps (and never past the end of a
    learning-rate schedule that ends). ``progress`` and ``trial_progress`` are called after each
    profiled step and each trial's step.
    """
    options = _checked(experiment, steps, profile, trials)
    context = _Context(rules if isinstance(rules, RuleSet) else load_rules(rules), experiment.display_name, seed,
                       steps, is_adaptive(experiment.optimizer))
    target = resolve_device(profile.device)
    # alone or under a process group (DDP, FSDP2): each rank restarts every trial from its own copy of the
    # same state (its shards under FSDP2), and the figures are averaged over the ranks (run.trials.agreed)
    trying = options.enabled
    saved = capture(experiment) if profile.restore else None
    if seed is not None:
        seed_everything(seed)
    model = experiment.model
    if target is not None:
        model.to(target)
    start = capture(experiment) if trying else None  # after seeding and the move: where every trial begins
    rates = ahead(experiment)  # the schedule's rates from here on, to say how far towards its peak the run went
    scale = _update_scale(experiment) if trying else None
    # a short run: measure everything; each step's figures are read at once (to stop at a non-finite loss)
    monitor = Observer(model, update_every=1, histogram_sample=1, histogram_every=1, flush_every=1,
                       optimizer=experiment.optimizer)
    report: Optional[Report] = None
    shield = None
    try:
        # the profile's first batches are the trials' (they replay them): the stream keeps them as drawn
        stream = _Kept(batch_stream(experiment.batches), options.first_steps + HELD_OUT_BATCHES if trying else 0)
        began = time.perf_counter()
        dev = target or monitor.device
        peak = rates.index(max(rates)) if rates else None  # the step where the schedule's rate peaks
        report, profiled = _profile(experiment, monitor, stream, steps, dev, progress, context,
                          extend=profile.extend and distributed.context() is None,  # (ranks would have to agree)
                          peak=peak)
        profile_seconds = time.perf_counter() - began
        if start is not None and method_for(report.findings) == "norm":
            # a schedule that ends (OneCycleLR's total_steps) ends the run: no contender trains past its last step
            most = min(MOST_STEPS, len(rates) - 1) if 0 < len(rates) < LOOK_AHEAD else MOST_STEPS
            trial_set = _trials(experiment, TrialBatches(stream.kept, stream.stream, options.first_steps), options,
                                report, start, scale, dev, profile_seconds, trial_progress, most)
            report = _with_trials(report, profiled, trial_set, context)
        if rates:
            report = dataclasses.replace(report, schedule=_reach(rates, report))
    except KeyboardInterrupt:
        shield = interrupts.ignore()  # a second Ctrl-C must not lose the partial report being built
        partial = report if report is not None else _partial(monitor, "interrupted by Ctrl-C", context)
        raise Interrupted("interrupted: stopped by Ctrl-C", "the partial report covers the steps done",
                          partial=partial) from None
    except GradscopeError as exc:
        exc.partial = report if report is not None else _partial(monitor, exc.problem, context)
        raise
    finally:
        monitor.close()
        if saved is not None:
            restore_state(experiment, saved)
        interrupts.restore(shield)
    return report


def _with_trials(report: Report, profiled: Profile, trial_set: TrialSet, context: "_Context") -> Report:
    """The report again, its rules reading what the trials showed of unclipped training beside the profile
    (a run whose unclipped trial went unstable is an error whatever the profile showed), its advice the
    trials'."""
    profile = dataclasses.replace(profiled, trials=trial_outcome(trial_set))
    rebuilt = context.report(profile, report.stopped_reason)
    return dataclasses.replace(rebuilt, extended=report.extended,
                               recommendation=recommend(rebuilt.statistics, rebuilt.findings, trial_set))


def trial_outcome(trial_set: TrialSet) -> TrialOutcome:
    """What the trials showed of unclipped training, as the rules read it."""
    reference = trial_set.reference
    return TrialOutcome(unclipped_steps=len(reference.losses), unclipped_unstable=not reference.stable,
                        clipped_stable=sum(t.stable for t in trial_set.trials))


def _checked(experiment: Experiment, steps: int, profile: ProfileOptions,
             trials: Union[TrialOptions, int]) -> TrialOptions:
    """diagnose()'s arguments checked, each wrong one a one-line error; the trials' options as given."""
    if not isinstance(experiment, Experiment):
        raise ExperimentError(f"diagnose() takes a gradscope.Experiment, not {type(experiment).__name__}",
                              "wrap your model, optimizer and batches in gradscope.Experiment(...)")
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ExperimentError(f"steps must be between 1 and {MAX_STEPS}, got {steps}",
                              "a few dozen steps show the trend; use Monitor for whole training runs")
    if not isinstance(profile, ProfileOptions):
        raise ExperimentError(f"profile takes a gradscope.ProfileOptions, not {type(profile).__name__}",
                              "ProfileOptions(extend=False), say")
    return trials if isinstance(trials, TrialOptions) else TrialOptions(most=trials)


class _Context(NamedTuple):
    """What a report of the profile says besides the Profile: the rules, the names, what was asked for."""

    rules: RuleSet
    model_name: str
    seed: Optional[int]
    steps_requested: int
    adaptive_optimizer: bool

    def report(self, profile: Profile, stopped_reason: Optional[str] = None) -> Report:
        return build_report(profile, rules=self.rules, model_name=self.model_name, stopped_reason=stopped_reason,
                            seed=self.seed, steps_requested=self.steps_requested,
                            adaptive_optimizer=self.adaptive_optimizer)


class _Kept:
    """A batch stream that keeps its first ``keep`` batches as they are drawn (``kept``)."""

    def __init__(self, stream: Iterator[Any], keep: int) -> None:
        self.stream, self.keep, self.kept = stream, keep, []

    def __iter__(self) -> "_Kept":
        return self

    def __next__(self) -> Any:
        batch = next(self.stream)
        if len(self.kept) < self.keep:
            self.kept.append(batch)
        return batch


def _profile_steps(experiment: Experiment, monitor: Observer, stream: Iterator[Any], first: int, end: int,
                   device: torch.device, progress: Optional[Progress], watch: SpikeWatch) -> Optional[str]:
    """Train and observe steps ``first`` to ``end``; why the run stopped early, if it did. A spike's batch is
    taken apart sample by sample (``watch``) before its optimizer step."""
    experiment.model.train()
    for step in range(first, end):
        batch = next_batch(stream, step)
        loss = forward_backward(experiment, batch, step, device)
        out = monitor.observe(loss)
        watch.see(step, out, lambda drawn=batch: to_device(drawn, device), batch)
        if progress is not None:
            progress(step + 1, end, out)
        if not math.isfinite(out["loss"]):
            return f"the loss was {out['loss']} at step {step}: stopped before optimizer.step()"
        optimizer_step(experiment, step)
    return None


def _profile(experiment: Experiment, monitor: Observer, stream: Iterator[Any], steps: int, device: torch.device,
             progress: Optional[Progress], context: _Context, extend: bool, peak: Optional[int] = None
             ) -> Tuple[Report, Profile]:
    """Profile ``steps`` steps and, with ``extend``, go on, ``steps`` at a time up to EXTEND x ``steps``:

    - through a warm-up, while the schedule's ``peak`` step lies ahead: a profile that ends inside a warm-up
      has seen only the low rates, and a run whose peak rate is too hot looks healthy there;
    - while the profile has seen nothing: no warning or error, and a loss that has not fallen by
      EXTEND_UNLESS_FALLEN (its last quarter against its first).

    Between rounds only the findings are read; the report is built once, of every step profiled (before close():
    profiling the Monitor measures the last step's update)."""
    watch = SpikeWatch(context.rules, experiment.model, lambda batch: compute_loss(experiment, batch),
                       enabled=distributed.context() is None)
    stopped = _profile_steps(experiment, monitor, stream, 0, steps, device, progress, watch)
    done, to_peak = steps, False
    while extend and stopped is None and done < EXTEND * steps:
        if peak is not None and done <= peak:
            to_peak = True
        else:
            statistics, findings = assess(monitor.profile(), context.rules)
            loss = statistics.model.loss
            if any(f.severity != "info" for f in findings) or \
                    rise(loss[np.isfinite(loss)]) < 1.0 - EXTEND_UNLESS_FALLEN:
                break
        stopped = _profile_steps(experiment, monitor, stream, done, done + steps, device, progress, watch)
        done += steps
    profiled = dataclasses.replace(monitor.profile(), spikes=tuple(watch.found))
    report = context.report(profiled, stopped)
    if done == steps:
        return report, profiled
    if to_peak:
        return dataclasses.replace(report, extended=because("profile_to_peak", asked=steps, peak=peak,
                                                            steps=monitor.steps)), profiled
    return dataclasses.replace(report, extended=because("profile_extended", asked=steps, fallen=EXTEND_UNLESS_FALLEN,
                                                        steps=monitor.steps)), profiled


def _trials(experiment: Experiment, data: TrialBatches, options: TrialOptions, report: Report, start: Dict[str, Any],
            scale: Optional[float], device: torch.device, profile_seconds: float,
            progress: Optional[TrialProgress], most_steps: int) -> TrialSet:
    """Run the trials, their first rung on the stream's first batches, judged on the HELD_OUT_BATCHES after them.

    The same batches whatever ``--steps`` the profile ran, so the advice does not depend on it. When the
    profile itself ran exactly the first rung's batches, or went non-finite on the first of them (an
    unclipped run from the same start on the same batches, which a rerun would repeat), it is the
    unclipped reference; otherwise one is run.
    """
    steps = options.first_steps
    m = report.statistics.model
    diverged = 0 < m.steps <= steps and not math.isfinite(m.loss[-1])  # it stopped at a non-finite loss
    rerun = m.steps != steps and not diverged
    if diverged:
        reference = Trial(math.inf, tuple(m.loss.tolist()), tuple(m.global_norm.tolist()), math.inf)
    elif not rerun:  # the profile was the unclipped run on exactly these batches
        per_batch = held_out(experiment, data.held_out, device)
        reference = Trial(math.inf, tuple(m.loss.tolist()), tuple(m.global_norm.tolist()), median_or_inf(per_batch),
                          held_out_batches=per_batch)
    else:
        reference = run_reference(experiment, start, data, steps, device)
    trial_set = run_trials(experiment, start, data, reference, candidates(m.global_norm, scale), options,
                           device=device, profile_seconds=profile_seconds, reference_rerun=rerun, progress=progress,
                           most_steps=most_steps)
    if data.repeats():
        trial_set = dataclasses.replace(trial_set, notes=(*trial_set.notes, because("batches_repeat")))
    return trial_set


def _reach(rates: List[float], report: Report) -> ScheduleReach:
    """How far towards the peak of ``rates`` (the schedule from the start) the profile and the trials went."""
    peak = max(rates)
    trials = report.recommendation.evidence.trials
    profiled = report.statistics.model.steps
    longest = trials.longest if trials is not None else 0
    return ScheduleReach(peak_lr=peak, peak_step=rates.index(peak), looked_ahead=len(rates), profile_steps=profiled,
                         profile_lr=max(rates[:max(profiled, 1)]), trial_steps=longest,
                         trial_lr=max(rates[:longest]) if longest else 0.0)


def _update_scale(experiment: Experiment) -> Optional[float]:
    """For an SGD-style optimizer, the threshold that bounds a step to UPDATE_RATIO of the weights' norm."""
    group = experiment.optimizer.param_groups[0]
    if is_adaptive(experiment.optimizer) or "lr" not in group or not isinstance(group["lr"], (int, float)):
        return None  # adaptive steps do not scale with the gradient's norm
    lr_eff = group["lr"] / max(1.0 - float(group.get("momentum", 0.0) or 0.0), 1e-3)
    with torch.no_grad():
        # abs(): a complex parameter's norm counts its imaginary part (a cast to float would drop it)
        squares = [p.detach().abs().float().pow(2).sum() for p in experiment.model.parameters() if p.requires_grad]
        weight_norm = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return update_estimate(lr_eff, weight_norm)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _partial(monitor: Observer, reason: str, context: _Context) -> Optional[Report]:
    if monitor.steps == 0 or distributed.context() is not None:  # other ranks may not reach a collective
        return None
    return context.report(monitor.profile(), reason)


def resolve_device(device: Optional[str]) -> Optional[torch.device]:
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ExperimentError(f"unknown device {device!r}", "use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExperimentError(f"the device {device!r} was asked for, but torch sees no CUDA GPU here",
                              "ask for cpu (or auto), or install a CUDA build of torch on a GPU machine")
    return torch.device(device)
