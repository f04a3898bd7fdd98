"""Judge threshold trials: which thresholds to try, whether a trial stayed stable, and which one wins.

Pure functions over plain data; :mod:`gradscope.run.trials` runs the trials. The principle (see
docs/advice.md): try global-norm thresholds on a half-decade lattice, decades first and then the
half-decade steps beside the pick; a trial that diverges, or whose loss (training or held-out) or
gradient norm climbs, is unstable; the loosest stable trial within 5% of the best held-out improvement
(or within 1% of the start loss, whichever is wider: a smaller difference is no evidence) wins, kept
one step below a looser threshold that went unstable.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..analyse.stats import START_STEPS, rise, start_level, trend
from .reasons import Reason, Reasons, because

LATTICE_STEP = 0.5  # decades between candidates: 1, 0.32, 0.1, 0.032, ...
SPAN_ABOVE = 0.5  # decades above the first step's norm the candidates start from
SPAN_BELOW = 2.5  # decades below it they reach at least: three decades in all
UPDATE_RATIO = 1e-3  # a per-step ||dw||/||w|| commonly held safe
MAX_POINTS = 13  # lattice points at most: six decades
LOSS_RISE = 2.0  # a trial whose last-quarter loss is this many times its first quarter's is climbing
LOSS_BLOWUP = 10.0  # a training loss this many times its start has diverged: the trial stops there
NORM_GROWTH = 10.0  # a pre-clip norm trend compounding to this over the trial is unstable
RUNG_GROWTH = 2  # each rung of the trials doubles the horizon, as successive halving does with eta 2
MOST_CONTENDERS = 3  # thresholds continued past a rung at most: the pick and one on each side of it
FIRST_CONTENDERS = 2  # past the first rung: the pick and the neighbour short-horizon bias would hide
TIE = 0.05  # trials within this share of the best held-out improvement over the start count as near-best
SIGNAL = 0.01  # held-out differences below this share of the start loss are no evidence at the trial horizon


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A trial's held-out loss after ``steps`` training steps: where it stood at the end of a rung."""

    steps: int
    held_out: float  # median over the held-out batches (inf once diverged)
    held_out_batches: Tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run from the common start, clipping the global norm at ``threshold`` (inf: unclipped)."""

    threshold: float
    losses: Tuple[float, ...]  # training loss per step
    norms: Tuple[float, ...]  # pre-clip global norm per step
    held_out: float  # median loss on the held-out batches at the end (inf once diverged)
    unstable: str = ""  # why the trial counts as unstable; empty when it stayed stable
    seconds: float = 0.0
    held_out_batches: Tuple[float, ...] = ()  # the loss on each held-out batch, for paired comparisons
    checkpoints: Tuple[Checkpoint, ...] = ()  # the held-out loss at the end of each rung it reached

    @property
    def horizon(self) -> int:
        """The most steps it trained without diverging: the end of the last rung it reached."""
        return self.checkpoints[-1].steps if self.checkpoints else len(self.losses)

    @property
    def stable(self) -> bool:
        return not self.unstable

    @property
    def clip_fraction(self) -> float:
        """Fraction of the trial's steps whose pre-clip norm exceeded the threshold."""
        if not self.norms:
            return 0.0
        return float(np.mean([not n <= self.threshold for n in self.norms]))


@dataclasses.dataclass(frozen=True)
class TrialSet:
    """Every trial of one diagnose run, the unclipped reference, and the verdict."""

    steps: int  # training steps per trial
    start_held_out: float  # held-out loss at the common start
    reference: Trial  # the unclipped run (the profile itself when it ran the trial batches)
    trials: Tuple[Trial, ...]  # clipped trials, loosest first
    untried: Tuple[float, ...]  # candidates the search did not reach
    stopped: Reasons  # why the search ended where it did (empty: it settled)
    winner: Optional[float]
    reason: Reasons  # why the winner won (see ``ruling``)
    seconds: float  # wall time of the trials
    profile_seconds: float  # wall time of the profile, to state the trials' cost against
    notes: Reasons = ()  # what the reader should know of how the trials ran
    reference_rerun: bool = False  # the unclipped reference was trained for the trials (not the profile itself)
    spent_trials: Optional[int] = None  # steps the clipped trials trained, replays included (None: their lengths)
    adaptive: bool = False  # the contenders went on past the first rung while the ranking was open
    state_bytes: Optional[int] = None  # bytes of one kept copy of the training state, on this rank
    states_most: Optional[int] = None  # copies kept at once at most: the common start, the contenders, one finishing

    @property
    def learned(self) -> bool:
        """Whether a stable trial ended measurably below the start on the held-out batches (by more than
        SIGNAL of the start loss) at the horizon the pick was made. Without that, the trials rank
        thresholds by stability alone."""
        return learned(final_field(self.trials).trials, self.start_held_out)

    @property
    def longest(self) -> int:
        """The most steps any trial reached: the horizon the pick was made at, or past it."""
        return max([self.steps, *(t.horizon for t in self.trials)])

    @property
    def spent(self) -> int:
        """Training steps the trials took: every clipped trial's, and the reference's when it was rerun."""
        trained = self.spent_trials if self.spent_trials is not None else sum(len(t.losses) for t in self.trials)
        return trained + (len(self.reference.losses) if self.reference_rerun else 0)


def candidates(norms: np.ndarray, update_estimate: Optional[float] = None) -> List[float]:
    """Half-decade thresholds, loosest first: from above the first step's norm down at least three decades.

    The first step's norm is the one measured before any update, so a run that blows up at once cannot
    inflate it. Under SGD the step is at most lr_eff x threshold, so ``update_estimate`` (the threshold
    that keeps the step near UPDATE_RATIO of the weights' norm) extends the range down to it.
    """
    finite = norms[np.isfinite(norms) & (norms > 0)]
    if not len(finite):
        return []
    high = math.floor(math.log10(float(finite[0])) / LATTICE_STEP + SPAN_ABOVE / LATTICE_STEP + 1e-9)
    low = high - round((SPAN_ABOVE + SPAN_BELOW) / LATTICE_STEP)
    if update_estimate is not None and update_estimate > 0:
        low = min(low, math.floor(math.log10(update_estimate) / LATTICE_STEP) - 1)  # one step below it
    return [lattice(k) for k in range(high, max(low, high - MAX_POINTS + 1) - 1, -1)]


def update_estimate(lr_eff: Optional[float], weight_norm: float) -> Optional[float]:
    """The threshold that bounds an SGD step to UPDATE_RATIO of the weights' norm; None for adaptive optimizers."""
    if lr_eff is None or not lr_eff > 0 or not weight_norm > 0:
        return None
    return UPDATE_RATIO * weight_norm / lr_eff


def lattice(k: int) -> float:
    """The k-th lattice threshold, rounded to two significant digits as a person would write it."""
    return two_figures(10 ** (k * LATTICE_STEP))


def two_figures(value: float) -> float:
    """Round to two significant digits, so a threshold reads like one a person would write (the one
    rounding of every threshold gradscope names); zero, negatives, inf and NaN pass through."""
    if not value > 0 or not math.isfinite(value):
        return value
    return float(f"{value:.2g}")


def assess(losses: Sequence[float], norms: Sequence[float], held_out: float, start_held_out: float) -> str:
    """Why a trial is unstable, or "" when it stayed stable.

    Unstable means diverging: non-finite values, a loss that blew up or climbs, a held-out loss that
    rose well above the start, or a pre-clip norm that compounds. A trial that merely learned little
    is stable; its held-out loss ranks it.
    """
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        return f"the loss went non-finite at step {bad}"
    blown = blew_up(losses)
    if blown is not None:
        return f"the loss blew up to x{blown:.3g} its start"
    if not math.isfinite(held_out):
        return "the held-out loss was non-finite"
    if held_out > LOSS_RISE * start_held_out:
        return f"the held-out loss rose from {start_held_out:.4g} to {held_out:.4g}"
    climb = rise(np.asarray(losses, dtype=np.float64))
    if climb > LOSS_RISE:
        return f"the training loss rose x{climb:.3g} from its first quarter to its last"
    growth, growth_low = trend(np.arange(len(norms)), np.asarray(norms, dtype=np.float64))
    over_run = growth ** max(len(norms) - 1, 0) if math.isfinite(growth) else math.nan
    if growth_low > 1.0 and over_run > NORM_GROWTH:
        return f"the pre-clip gradient norm grew x{over_run:.3g} over the trial"
    return ""


def blew_up(losses: Sequence[float]) -> Optional[float]:
    """The loss over its start level once its last few steps sit above LOSS_BLOWUP times it, else None.

    The median of the last START_STEPS losses, not the last one: a single outlier batch is data, not
    divergence.
    """
    if len(losses) < 2 * START_STEPS:
        return None
    start = start_level(np.asarray(losses, dtype=np.float64))
    ratio = float(np.median(losses[-START_STEPS:])) / start if start > 0 else math.nan
    return ratio if ratio > LOSS_BLOWUP else None


def next_candidate(candidates: Sequence[float], done: Sequence[Trial], start_held_out: float = math.nan,
                   reference: Optional[Trial] = None) -> Optional[float]:
    """The next threshold to try, or None: decades down to the basin, then the half-decade steps beside the pick.

    Decades (every other lattice step) are tried loosest first, as a learning-rate range test sweeps, and
    the descent stops once a stable decade is not clearly better than the best above it (tighter
    clipping only slows training further). Then the half-decade steps beside the pick settle it, the
    looser one first.
    """
    tried = {t.threshold: t for t in done}
    coarse = [c for i, c in enumerate(candidates) if i % 2 == 0]
    descended = [tried[c] for c in coarse if c in tried]
    stable_above = [t for t in descended[:-1] if t.stable]
    settled = bool(stable_above) and descended[-1].stable and not clearly_better(
        descended[-1], min(stable_above, key=lambda t: t.held_out), evidence_floor(start_held_out))
    if not settled:
        for c in coarse:
            if c not in tried:
                return c
    chosen = winning_trial(done, start_held_out, reference)
    if chosen is None:
        return None
    i = list(candidates).index(chosen.threshold)
    return next((candidates[j] for j in (i - 1, i + 1) if 0 <= j < len(candidates) and candidates[j] not in tried),
                None)


def evidence_floor(start_held_out: float) -> float:
    """The smallest held-out difference that counts as evidence: SIGNAL of the start loss (0 when unknown)."""
    return SIGNAL * abs(start_held_out) if math.isfinite(start_held_out) else 0.0


def learned(trials: Sequence[Trial], start_held_out: float) -> bool:
    """Whether any stable trial's held-out loss ended more than the evidence floor below the start."""
    return any(t.stable and t.held_out < start_held_out - evidence_floor(start_held_out) for t in trials)


def clearly_better(a: Trial, b: Trial, least: float = 0.0) -> bool:
    """Whether the held-out batches show ``a`` better than ``b``: the mean of the paired per-batch
    differences is more than one standard error, and more than ``least``, below zero. Without per-batch
    losses, a median lower by more than ``least``."""
    x, y = np.asarray(a.held_out_batches, dtype=np.float64), np.asarray(b.held_out_batches, dtype=np.float64)
    if len(x) < 2 or len(x) != len(y) or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return a.held_out < b.held_out - least
    d = x - y
    mean, se = float(np.mean(d)), float(np.std(d, ddof=1)) / math.sqrt(len(d))
    return mean < -max(se, least) if se > 0 or least > 0 else mean < 0


def winning_trial(trials: Sequence[Trial], start_held_out: float = math.nan, reference: Optional[Trial] = None,
         beside: Sequence[Trial] = ()) -> Optional[Trial]:
    """The choice: the loosest stable trial near the best held-out loss, kept one lattice step below a
    looser threshold that went unstable, as a learning-rate range test keeps below the point of divergence.

    Near means within TIE of the best improvement over the start, or within SIGNAL of the start loss,
    whichever is wider: a difference smaller than both is no evidence that one threshold trains better.
    Looser first, because a 30-step trial shows what a looser threshold's larger steps cost but not what
    they gain over hundreds of steps (so where the trials show no learning yet, the loosest threshold
    that left the loss where it was wins); the margin, because the edge of stability at 30 steps is not
    the edge at 300. ``beside``: thresholds tried but not carried to the horizon of ``trials``; never the
    pick, they still stand in the ladder as they were last seen (a looser one that was stable keeps the
    margin from applying, as it did before they were left behind).
    """
    stable = [t for t in trials if t.stable]
    if not stable:
        return None
    best = min(stable, key=lambda t: t.held_out)
    gain = start_held_out - best.held_out if math.isfinite(start_held_out) else 0.0
    near = [t for t in stable if t.held_out <= best.held_out + max(TIE * max(gain, 0.0), evidence_floor(start_held_out))]
    chosen = max(near, key=lambda t: t.threshold)
    ladder = sorted(trials, key=lambda t: -t.threshold)
    looser = [t for t in sorted([*trials, *beside], key=lambda t: -t.threshold) if t.threshold > chosen.threshold]
    if reference is not None:
        looser = [reference, *looser]
    if not looser or looser[-1].stable:
        return chosen
    below = [t for t in ladder if t.threshold < chosen.threshold and t.stable]
    return below[0] if below else chosen


def at(trial: Trial, steps: int) -> Trial:
    """The trial as it stood after ``steps`` steps, a checkpoint it reached. Its verdict stays the one of its
    longest horizon: a threshold that is stable at 30 steps and unstable at 90 is unstable."""
    point = next(c for c in trial.checkpoints if c.steps == steps)
    return dataclasses.replace(trial, losses=trial.losses[:steps], norms=trial.norms[:steps], held_out=point.held_out,
                               held_out_batches=point.held_out_batches)


def standing(trials: Sequence[Trial], steps: int) -> List[Trial]:
    """The field at ``steps``, loosest first: every trial that reached it, as it stood there, and every
    trial that went unstable, wherever it did (a threshold that failed sooner fails there too)."""
    field = []
    for t in trials:
        if any(c.steps == steps for c in t.checkpoints):
            field.append(at(t, steps))
        elif not t.stable:
            field.append(t)
    return sorted(field, key=lambda t: -t.threshold)


def rungs(trials: Sequence[Trial]) -> List[int]:
    """The horizons the trials were checkpointed at, shortest first."""
    return sorted({c.steps for t in trials for c in t.checkpoints})


@dataclasses.dataclass(frozen=True)
class Field:
    """The trials at one horizon: those that reached it, as they stood there, with every one that went
    unstable (``trials``), and the stable ones left behind at a shorter horizon (``beside``)."""

    steps: int
    trials: List[Trial]
    beside: List[Trial]


def field_at(trials: Sequence[Trial], steps: int) -> Field:
    """The field at ``steps``, with the thresholds left behind before it beside it."""
    here = standing(trials, steps)
    shown = {t.threshold for t in here}
    return Field(steps, here, sorted((t for t in trials if t.threshold not in shown), key=lambda t: -t.threshold))


def final_field(trials: Sequence[Trial]) -> Field:
    """The field the choice is made at: the longest rung that any stable trial reached (trials without
    checkpoints, as given: one rung at their own length)."""
    for steps in reversed(rungs(trials)):
        field = field_at(trials, steps)
        if any(t.stable for t in field.trials):
            return field
    return Field(max((len(t.losses) for t in trials), default=0), sorted(trials, key=lambda t: -t.threshold), [])


def contenders(field: Field, start_held_out: float, reference: Optional[Trial] = None) -> List[Trial]:
    """Who goes on to the next rung, most needed first: the pick, the stable thresholds beside it, and the
    best held-out loss; at most MOST_CONTENDERS. Of the two beside it, the one short-horizon bias would
    hide comes first: where nothing has been learned yet, the looser one (its larger steps have not paid
    off yet); where something has, the tighter one (the answer if the pick meets a cliff later)."""
    chosen = winning_trial(field.trials, start_held_out, reference, field.beside)
    if chosen is None:
        return []
    stable = [t for t in sorted(field.trials, key=lambda t: -t.threshold) if t.stable]
    i = next(k for k, t in enumerate(stable) if t.threshold == chosen.threshold)
    tighter = stable[i + 1] if i + 1 < len(stable) else None
    looser = stable[i - 1] if i > 0 else None
    best = min(stable, key=lambda t: t.held_out)
    ordered: List[Trial] = [chosen]
    sides = (tighter, looser) if learned(field.trials, start_held_out) else (looser, tighter)
    for t in (*sides, best):
        if t is not None and all(t.threshold != o.threshold for o in ordered):
            ordered.append(t)
    return ordered[:MOST_CONTENDERS]


def promote(trials: Sequence[Trial], start_held_out: float, reference: Optional[Trial] = None,
            most_steps: int = 0) -> Tuple[List[float], Reason]:
    """The thresholds to continue for another rung, most needed first, or none and why the ranking is settled.

    The field is judged at the longest rung reached. It stays open while nothing has been learned
    measurably, and while the pick has not held its place over a doubling of the horizon (at the first
    rung, where there is no doubling yet: while it is not clearly better, by the paired held-out test and
    the evidence floor, than the neighbour short-horizon bias would hide). ``most_steps`` caps the
    horizon (0: no cap).
    """
    field = final_field(trials)
    steps = field.steps
    # past the first rung the one doubt a short ranking leaves is tested: the pick against the neighbour that
    # short-horizon bias hides; once the ranking has shown itself open, both neighbours and the best go on
    ahead = contenders(field, start_held_out, reference)[:FIRST_CONTENDERS if len(rungs(trials)) <= 1 else None]
    if not ahead:
        return [], because("none_stable")
    if most_steps and steps * RUNG_GROWTH > most_steps:
        return [], because("rung_past_longest", next=steps * RUNG_GROWTH, longest=most_steps)
    if len(ahead) == 1:
        return [], because("one_left", steps=steps)
    if not learned(field.trials, start_held_out):
        return [t.threshold for t in ahead], because("nothing_learned_within", steps=steps)
    chosen = ahead[0]
    earlier = [h for h in rungs(trials) if h < steps]
    if earlier:
        before_field = field_at(trials, earlier[-1])
        before = winning_trial(before_field.trials, start_held_out, reference, before_field.beside)
        if before is not None and before.threshold == chosen.threshold:
            return [], because("pick_held", since=earlier[-1], steps=steps)
        return [t.threshold for t in ahead], because("pick_moved", since=earlier[-1], steps=steps)
    lead = evidence_floor(start_held_out)
    if all(clearly_better(chosen, t, lead) for t in ahead[1:]):
        return [], because("pick_clear", steps=steps)
    return [t.threshold for t in ahead], because("neighbours_tied", steps=steps)


def ruling(trials: Sequence[Trial], start_held_out: float, reference: Optional[Trial] = None
           ) -> Tuple[Optional[float], Reasons]:
    """The winning threshold and why (see :func:`winning_trial`), at the longest rung a stable trial reached."""
    field = final_field(trials)
    steps, trials = field.steps, field.trials
    chosen = winning_trial(trials, start_held_out, reference, field.beside)
    if chosen is None:
        return None, (because("no_stable_trial"),)
    best = min((t for t in trials if t.stable), key=lambda t: t.held_out)
    figures = dict(chosen=chosen.held_out, best=best.held_out, best_threshold=best.threshold, start=start_held_out,
                   steps=steps if rungs(trials) else None)
    if chosen is best:
        reasons = [because("lowest_held_out", **figures)]
    elif chosen.threshold > best.threshold:
        reasons = [because("least_clipping_near_best", tie=TIE, signal=SIGNAL, **figures)]
    else:
        reasons = [because("below_unstable_neighbour", **figures)]
    unstable = [t for t in trials if not t.stable]
    if unstable:
        reasons.append(because("some_unstable", unstable=len(unstable), tried=len(trials),
                               loosest=unstable[0].threshold))
    if not learned(trials, start_held_out):
        reasons.append(because("nothing_learned", best=best.held_out, signal=SIGNAL))
    return chosen.threshold, tuple(reasons)
