"""Trials: candidates on a lattice, instability judged, the margin rule, and trials run for real from one start."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

import gradscope
from gradscope.advise import judge
from gradscope.run import schedule
from gradscope.cli import main
from gradscope.errors import ExperimentError
from gradscope.advise.judge import Checkpoint, Trial
from gradscope.run.options import TrialOptions
from gradscope.advise.reasons import because
from gradscope.present.render import trials_table
from gradscope.present.wording import say

from models import exploding_rnn, healthy_mlp, hot_gru, hot_resnet, noise_targets


# -- the judge, on plain data ---------------------------------------------------------------------------
def test_candidates_descend_on_the_half_decade_lattice_over_three_decades():
    norms = np.array([2.0, 5.0, 1e3, 1e6, np.inf])  # a run that blows up: the first step anchors the range
    values = judge.candidates(norms)
    assert values == sorted(values, reverse=True)
    assert 2.0 < values[0] <= 2.0 * 10 ** 0.5  # the largest lattice point within half a decade above step 0
    assert math.log10(values[0] / values[-1]) >= 3 - 0.05
    ratios = np.array(values[:-1]) / np.array(values[1:])
    assert np.allclose(ratios, 10 ** 0.5, rtol=0.08)  # two significant digits: 3.2, 1, 0.32, ...


def test_an_sgd_update_estimate_below_the_range_extends_it():
    norms = np.array([1.0, 1.0, 1.0])
    plain = judge.candidates(norms)
    extended = judge.candidates(norms, update_estimate=1e-5)
    assert extended[:len(plain)] == plain and extended[-1] <= 1e-5 < plain[-1]
    assert judge.update_estimate(lr_eff=10.0, weight_norm=50.0) == pytest.approx(judge.UPDATE_RATIO * 5.0)
    assert judge.update_estimate(None, 50.0) is None


@pytest.mark.parametrize("losses, norms, held_out, why", [
    ([1.0, 0.9, math.nan], [1, 1, 1], math.inf, "non-finite"),
    ([1.0, 1.0, 1.0, 20, 30, 40], [1] * 6, 0.5, "blew up"),
    ([1.0, 0.9, 0.8, 0.7], [1] * 4, 2.5, "held-out loss rose"),
    ([1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0], [1] * 8, 0.5, "training loss rose"),
    ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], [2.0 ** k for k in range(8)], 0.5, "norm grew"),
])
def test_each_kind_of_instability_is_named(losses, norms, held_out, why):
    assert why in judge.assess(losses, norms, held_out, start_held_out=1.0)


def test_a_learning_trial_is_stable_and_one_outlier_batch_is_not_a_blow_up():
    losses = [1.0, 0.9, 0.8, 60.0, 0.7, 0.6, 0.5, 0.5]
    assert judge.assess(losses, [1.0] * 8, 0.6, start_held_out=1.0) == ""


def test_a_trial_that_learned_little_is_stable_and_ranked_by_its_held_out_loss():
    assert judge.assess([1.0] * 8, [1.0] * 8, 1.01, start_held_out=1.0) == ""


def _trial(threshold, held_out, unstable=""):
    return Trial(threshold, (1.0, 0.5), (1.0, 1.0), held_out, unstable)


def test_an_unstable_trial_never_wins_however_low_its_loss():
    trials = [_trial(10.0, 0.05, "the loss blew up"), _trial(3.2, 0.20), _trial(1.0, 0.30), _trial(0.32, 0.45)]
    winner, reason = judge.ruling(trials, start_held_out=1.0)
    assert winner == 1.0  # 10 scored lowest but went unstable; 3.2 is best, and sits right below it
    assert "1 of 4 went unstable" in say(reason)


def test_choose_gives_no_winner_when_nothing_was_stable():
    winner, reason = judge.ruling([_trial(1.0, math.inf, "diverged")], start_held_out=1.0)
    assert winner is None and "learning rate" in say(reason)


def test_the_search_descends_by_decades_then_tries_the_half_decades_beside_the_pick():
    lattice = [10.0, 3.2, 1.0, 0.32, 0.1, 0.032, 0.01, 0.0032, 0.001]
    held = {10.0: math.inf, 1.0: 0.5, 0.1: 0.3, 0.01: 0.4, 0.32: 0.35, 0.032: 0.25, 3.2: 0.9, 0.001: 0.1}
    done, order = [], []
    while (c := judge.next_candidate(lattice, done)) is not None:
        order.append(c)
        done.append(_trial(c, held[c], "" if math.isfinite(held[c]) else "diverged"))
    # decades down to 0.01, which is no better than 0.1, so the descent stops (0.001 is never tried); then
    # the half-decades beside the pick 0.1, the looser first; 0.032 is better, and its neighbours are known
    assert order == [10.0, 1.0, 0.1, 0.01, 0.32, 0.032]
    assert judge.ruling(done, start_held_out=1.0)[0] == 0.032


def test_the_loosest_trial_within_5_percent_of_the_best_improvement_wins():
    # start 1.0; best 0.50 at 0.01: an improvement of 0.5, so anything at or below 0.525 is near-best
    trials = [_trial(1.0, 0.60), _trial(0.1, 0.52), _trial(0.01, 0.50)]
    winner, reason = judge.ruling(trials, start_held_out=1.0)
    assert winner == 0.1 and "within 5% of the best held-out improvement" in say(reason)
    assert judge.ruling([_trial(1.0, 0.60), _trial(0.1, 0.53), _trial(0.01, 0.50)], 1.0)[0] == 0.01


def test_the_pick_stays_one_step_below_a_looser_threshold_that_went_unstable():
    reference = _trial(math.inf, math.inf, "the loss blew up")
    trials = [_trial(3.2, 0.40), _trial(1.0, 0.41), _trial(0.32, 0.60)]
    winner, reason = judge.ruling(trials, 1.0, reference)  # 3.2 is best, but the unclipped run above it blew up
    assert winner == 1.0 and "one step below" in say(reason)
    stable_reference = _trial(math.inf, 0.45)
    assert judge.ruling(trials, 1.0, stable_reference)[0] == 3.2
    edge = [_trial(10.0, math.inf, "diverged"), _trial(3.2, 0.40)]  # nothing stable below: keep the pick
    assert judge.ruling(edge, 1.0)[0] == 3.2


def _noisy(threshold, level, noise, seed=0):
    """A trial whose 8 held-out batches share a per-batch difficulty, plus its own noise."""
    rng = np.random.default_rng(seed)
    batches = tuple(float(v) for v in level + np.linspace(-0.5, 0.5, 8) + noise * rng.standard_normal(8))
    return Trial(threshold, (1.0, 0.9), (1.0, 1.0), float(np.median(batches)), held_out_batches=batches)


def test_better_needs_the_paired_held_out_difference_to_exceed_its_noise():
    assert judge.clearly_better(_noisy(0.01, 4.00, 0.02, seed=3), _noisy(0.1, 4.30, 0.02, seed=4))
    assert not judge.clearly_better(_noisy(0.01, 4.140, 0.02, seed=3), _noisy(0.1, 4.142, 0.02, seed=4))
    assert judge.clearly_better(_trial(0.01, 0.4), _trial(0.1, 0.5))  # without per-batch losses: the lower median


def test_a_consistent_difference_below_the_signal_floor_is_no_evidence():
    tight, loose = _noisy(0.001, 4.140, 0.001, seed=3), _noisy(0.01, 4.165, 0.001, seed=4)
    assert judge.clearly_better(tight, loose)  # 0.025 lower on every batch: far beyond its noise ...
    assert not judge.clearly_better(tight, loose, judge.evidence_floor(4.16))  # ... but under 1% of a start loss of 4.16


def test_where_the_trials_show_no_learning_yet_the_loosest_that_held_its_loss_wins():
    # start 4.16: the best trial gained 0.02 (0.5%), within the 1% signal floor of the others that held
    # their loss; 0.1 made it 20% worse, so the loosest that held, 0.01, wins rather than the tightest
    trials = [_trial(0.1, 5.0), _trial(0.01, 4.167), _trial(0.001, 4.142), _trial(0.0001, 4.156)]
    winner, reason = judge.ruling(trials, start_held_out=4.16)
    assert winner == 0.01 and not judge.learned(trials, 4.16)
    assert "no trial trained measurably" in say(reason) and "stability alone" in say(reason)  # the report says so
    # with a real gain the floor is too narrow to matter: 5% of the improvement rules, as before
    learning = [_trial(0.1, 5.0), _trial(0.01, 3.6), _trial(0.001, 3.0)]
    winner, reason = judge.ruling(learning, 4.16)
    assert winner == 0.001 and judge.learned(learning, 4.16) and "measurably" not in say(reason)


def test_the_report_says_when_no_trial_learned_and_how_to_see_further():
    def rendered(trials, steps=30, adaptive=True):
        winner, reason = judge.ruling(trials, 4.16)
        reference = Trial(math.inf, (4.2, 90.0), (1.0, 50.0), math.inf, "the loss blew up")
        trial_set = judge.TrialSet(steps=steps, start_held_out=4.16, reference=reference, trials=tuple(trials),
                                   untried=(), stopped=(because("first_rung_budget", steps=90),), winner=winner, reason=reason,
                                   seconds=1.0, profile_seconds=1.0, adaptive=adaptive)
        console = Console(width=200, record=True, color_system=None)
        console.print(trials_table(trial_set))
        return trial_set, console.export_text()

    flat, text = rendered([_trial(0.1, 5.0), _trial(0.01, 4.167), _trial(0.001, 4.142)])
    assert not flat.learned and "no threshold trained measurably within 30 steps" in text
    assert "a larger trial budget carries the contenders further" in text and "stopped: the first rung's share of the budget, 90 steps, would run out" in text
    _, text = rendered([_trial(0.1, 5.0), _trial(0.01, 4.167)], adaptive=False)
    assert "stability alone" in text and "the adaptive horizon" in text  # a fixed length: the way further
    learning, text = rendered([_trial(0.1, 5.0), _trial(0.01, 3.6), _trial(0.001, 3.0)])
    assert learning.learned and "measurably" not in text and "carries the contenders" not in text
    assert "--" not in text  # the library's words name no command-line flag


# -- the rungs: contenders carried to longer horizons ---------------------------------------------------------
def _rung(threshold, *held, unstable=""):
    """A trial checkpointed at 30, 60, 120, ... steps with these held-out losses (inf: diverged there)."""
    finite = [h for h in held if math.isfinite(h)]
    points = tuple(Checkpoint(30 * 2 ** i, h) for i, h in enumerate(finite))
    steps = points[-1].steps if points else 5
    steps += 10 if len(finite) < len(held) else 0  # it trained on into the next rung and diverged there
    losses = tuple(np.linspace(1.0, 0.5, steps))
    return Trial(threshold, losses, (1.0,) * steps, finite[-1] if finite and not unstable else math.inf,
                 unstable, checkpoints=points)


@st.composite
def _ladders(draw):
    """Trials on the lattice, loosest first: each reaches 1 to 4 rungs with any held-out losses, and may end
    unstable; and an unclipped reference, stable or not."""
    first = draw(st.integers(-8, 4))
    trials = []
    for k in range(draw(st.integers(1, 8))):
        held = draw(st.lists(st.floats(0.1, 10.0), min_size=1, max_size=4))
        unstable = draw(st.sampled_from(["", "", "the loss blew up"]))
        trials.append(_rung(judge.lattice(first - k), *held, unstable=unstable))
    reference = _rung(math.inf, draw(st.floats(0.1, 10.0)), unstable=draw(st.sampled_from(["", "diverged"])))
    return trials, reference, draw(st.floats(0.5, 12.0))


@given(_ladders())
@settings(max_examples=300, deadline=None)
def test_the_advice_never_leaves_the_evidence(ladder):
    """Whatever the trials show, the winner is a threshold a trial ran, stable, to the horizon the choice was
    made at: no rule steps to a threshold that no trial ran, or that a trial left behind earlier."""
    trials, reference, start = ladder
    winner, _ = judge.ruling(trials, start, reference)
    field = judge.final_field(trials)
    assert winner is None or winner in {t.threshold for t in field.trials if t.stable}
    assert (winner is None) == (not any(t.stable for t in field.trials))


def test_a_threshold_stable_at_30_steps_that_fails_at_60_loses():
    cliff = _rung(3.2, 0.30, math.inf, unstable="the loss went non-finite at step 70")  # best at 30, then fails
    trials = [cliff, _rung(1.0, 0.40, 0.20), _rung(0.32, 0.60, 0.45)]
    winner, reason = judge.ruling(trials, start_held_out=1.0)
    # 3.2 loses, and as a looser threshold that went unstable it keeps the pick one step below the best
    assert winner == 0.32 and say(reason).startswith("after 60 steps") and "one step below" in say(reason)
    assert judge.final_field(trials).steps == 60
    assert judge.standing(trials, 30)[0].unstable  # judged at the longest horizon it reached, even at 30


def test_contenders_are_the_pick_and_the_stable_thresholds_beside_it():
    field = [_rung(10.0, math.inf, unstable="diverged"), _rung(3.2, 0.5), _rung(1.0, 0.3), _rung(0.32, 0.31),
             _rung(0.1, 0.6)]
    ahead = [t.threshold for t in judge.contenders(judge.final_field(field), 1.0)]
    assert ahead == [1.0, 0.32, 3.2]  # the pick (loosest near-best), the tighter one first, then the looser
    assert len(ahead) <= judge.MOST_CONTENDERS


def test_the_ranking_stays_open_while_nothing_has_been_learned():
    trials = [_rung(0.1, 5.0), _rung(0.032, 4.2), _rung(0.01, 4.165)]  # start 4.16: nothing below it yet
    ahead, why = judge.promote(trials, start_held_out=4.16)
    assert len(ahead) >= 2 and "no threshold trained measurably within 30 steps" in say(why)


def test_a_clear_winner_at_the_first_rung_stops_at_once():
    trials = [_rung(3.2, 0.9), _rung(1.0, 0.3), _rung(0.32, 0.6)]
    ahead, why = judge.promote(trials, start_held_out=1.0)
    assert ahead == [] and why.code == "pick_clear" and "clearly ahead" in say(why)
    close = [_rung(3.2, 0.9), _rung(1.0, 0.3), _rung(0.32, 0.305)]  # 0.32 is as good within the floor
    ahead, why = judge.promote(close, start_held_out=1.0)
    assert ahead[:2] == [1.0, 0.32] and "could not be told apart" in say(why)


def test_the_climb_stops_once_the_pick_holds_over_a_doubling_and_goes_on_when_it_moves():
    held = [_rung(1.0, 0.30, 0.20), _rung(0.32, 0.305, 0.25)]  # 1.0 at 30 steps and at 60
    ahead, why = judge.promote(held, start_held_out=1.0)
    assert ahead == [] and "held its place from 30 to 60 steps" in say(why)
    moved = [_rung(1.0, 0.30, 0.25), _rung(0.32, 0.305, 0.15)]  # at 60 steps the tighter one is clearly ahead
    ahead, why = judge.promote(moved, start_held_out=1.0)
    assert ahead[0] == 0.32 and "moved between 30 and 60 steps" in say(why)
    assert judge.promote(moved, 1.0, most_steps=100)[0] == []  # no rung of 120 fits under a cap of 100


class _Scripted:
    """gradscope.run.schedule's Runner over held-out losses given as a function of (threshold, steps)."""

    def __init__(self, held, options):
        self.held, self.options = held, options
        self.start_held_out, self.reference = 1.0, _trial(math.inf, math.inf, "the loss blew up")
        self.steps, self.kept, self.spent, self.most_steps = {}, set(), 0, schedule.MOST_STEPS

    def judged(self):
        out = []
        for c, n in self.steps.items():
            points = tuple(Checkpoint(s, self.held(c, s)) for s in (30, 60, 120, 240, 480, 960) if s <= n)
            bad = "" if all(math.isfinite(p.held_out) for p in points) else "diverged"
            out.append(Trial(c, (1.0,) * n, (1.0,) * n, points[-1].held_out, bad, checkpoints=points))
        return out

    def advance(self, threshold, steps):
        self.spent += self.cost(threshold, steps)
        self.steps[threshold] = steps
        self.kept.add(threshold)

    def cost(self, threshold, steps):
        return steps - self.steps.get(threshold, 0) if threshold in self.kept else steps

    def keep(self, thresholds):
        self.kept &= set(list(thresholds)[:self.options.keep])

    def out_of_time(self):
        return False


def test_the_schedule_carries_the_contenders_past_a_late_cliff_within_its_budget():
    """3.2 is as good as 1.0 at 30 steps and the loosest, so 30-step trials pick it; it falls behind at 60
    and diverges by 120. The contenders go on and the pick lands below the cliff; the schedule stays
    within its budget, and continuing a contender costs only its new steps."""
    lattice = [3.2, 1.0, 0.32, 0.1, 0.032, 0.01]

    def held(c, steps):
        if c == 3.2:
            return {30: 0.30, 60: 0.29}.get(steps, math.inf)
        return {1.0: 0.30, 0.32: 0.5, 0.1: 0.7, 0.032: 0.8}.get(c, 0.9) - 0.05 * math.log2(steps / 30)

    def run(options):
        runner = _Scripted(held, options)
        runner.reference = _trial(math.inf, 0.6)  # unclipped training is stable here: no margin from it
        stopped = schedule.run(runner, lattice)
        return runner, stopped, judge.ruling(runner.judged(), 1.0, runner.reference)[0]

    runner, stopped, winner = run(TrialOptions())
    trials = runner.judged()
    assert winner < 3.2 and next(t for t in trials if t.threshold == winner).stable and stopped
    assert max(t.horizon for t in trials) >= 120 and runner.spent <= TrialOptions().budget_steps
    # nothing was replayed: every step paid for is a step some trial holds
    assert runner.spent == sum(len(t.losses) for t in trials)
    assert run(TrialOptions(steps=30))[2] == 3.2  # what 30-step trials alone pick
    tight, stopped, _ = run(TrialOptions(budget=5.0))
    assert "budget" in say(stopped) and tight.spent <= TrialOptions(budget=5.0).budget_steps


# -- trials run for real ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exploding():
    return gradscope.diagnose(exploding_rnn(), steps=30, seed=0)


def test_every_trial_starts_from_the_same_state_and_batches(exploding):
    trials = exploding.recommendation.evidence.trials
    firsts = {t.losses[0] for t in (trials.reference, *trials.trials)}
    assert len(firsts) == 1  # same weights, data and RNG for every trial, the profile included
    assert not trials.notes  # the held-out batches were never trained on


def test_the_report_states_the_memory_the_trials_hold(exploding):
    """One copy of the model's and the optimizer's state, in bytes, and how many copies are kept at once."""
    trials = exploding.recommendation.evidence.trials
    experiment = exploding_rnn()
    params = sum(p.numel() * p.element_size() for p in experiment.model.parameters())
    assert trials.state_bytes == params  # the weights; SGD without momentum keeps no state, and no grad yet
    assert trials.states_most == 1 + TrialOptions().keep + 1
    doc = exploding.to_dict()["recommendation"]["trials"]
    assert doc["state_bytes"] == trials.state_bytes and doc["states_kept_most"] == 5


def test_trials_stay_within_their_step_budget(exploding):
    trials = exploding.recommendation.evidence.trials
    spent = sum(len(t.losses) for t in trials.trials)  # every state was kept: nothing was replayed
    assert 0 < spent == trials.spent <= TrialOptions().budget_steps and not trials.reference_rerun
    first = sum(min(len(t.losses), trials.steps) for t in trials.trials)
    assert first <= TrialOptions().search_steps  # the first rung's search keeps to its share
    limited = gradscope.diagnose(exploding_rnn(), steps=30, seed=0, trials=TrialOptions(budget=1.0))
    assert limited.recommendation.evidence.trials.spent <= trials.steps
    timed = gradscope.diagnose(exploding_rnn(), steps=30, seed=0, trials=TrialOptions(seconds=1e-9)
                               ).recommendation.evidence.trials
    assert len(timed.trials) == 1 and "s limit" in say(timed.stopped) and timed.stopped[0].code == "trial_time_limit"  # the first trial always runs


def test_contenders_continue_from_their_kept_state_as_a_replay_from_the_start_would():
    """Continuing a contender does not replay its first steps, and gives what a replay gives: with one
    kept state the others are replayed from the start (and those steps are paid for); with the states in
    host memory nothing changes either. The same target and seed give the same document byte for byte."""
    climbing = gradscope.diagnose(noise_targets(), steps=30, seed=0)
    trials = climbing.recommendation.evidence.trials
    assert trials.adaptive and trials.longest >= 4 * trials.steps  # nothing learned: the contenders went on
    assert not trials.learned and "no threshold trained measurably within 120 steps" in say(trials.stopped)
    carried = [t for t in trials.trials if t.horizon > trials.steps]
    assert len(carried) >= 2 and all([c.steps for c in t.checkpoints] == [30, 60, 120] for t in carried
                                     if t.horizon == 120)
    assert trials.spent == sum(len(t.losses) for t in trials.trials) <= TrialOptions().budget_steps
    one = gradscope.diagnose(noise_targets(), steps=30, seed=0, trials=TrialOptions(keep=1))
    host = gradscope.diagnose(noise_targets(), steps=30, seed=0, trials=TrialOptions(keep_on_cpu=True))
    for other in (one, host):
        again = other.recommendation.evidence.trials
        assert [(t.threshold, t.losses, t.checkpoints) for t in again.trials] == \
            [(t.threshold, t.losses, t.checkpoints) for t in trials.trials]
        assert again.winner == trials.winner
    assert one.recommendation.evidence.trials.spent > trials.spent  # the replays were counted
    assert host.to_json() == climbing.to_json()
    assert gradscope.diagnose(noise_targets(), steps=30, seed=0).to_json() == climbing.to_json()


@pytest.mark.parametrize("steps, trial_steps, rerun", [(12, 12, False), (30, 45, True)])
def test_trial_steps_sets_how_long_every_trial_trains(exploding, steps, trial_steps, rerun):
    """Shorter or longer trials start from the same state and batches as the default ones; a profile of
    exactly their length is their unclipped reference, and longer ones draw batches past the profile's."""
    trials = gradscope.diagnose(exploding_rnn(), steps=steps, seed=0, trials=TrialOptions(steps=trial_steps)
                                ).recommendation.evidence.trials
    assert trials.steps == trial_steps and trials.reference_rerun is rerun and not trials.adaptive
    assert {t.losses[0] for t in (trials.reference, *trials.trials)} == {exploding.recommendation.evidence.trials
                                                                           .reference.losses[0]}
    assert all(len(t.losses) <= trial_steps for t in trials.trials) and trials.longest == trial_steps
    assert any(len(t.losses) == trial_steps for t in trials.trials if t.stable)
    assert sum(len(t.losses) for t in trials.trials) <= 4 * trial_steps  # the budget is in trials' worth


@pytest.mark.parametrize("options, message", [
    (dict(steps=0), "trial steps must be between 10 and 1000"), (dict(steps=9), "between 10 and 1000"),
    (dict(steps=1001), "between 10 and 1000"), (dict(steps=30.0), "between 10 and 1000"),
    (dict(most=-1), "0 to 100"), (dict(most=True), "0 to 100"), (dict(budget=0), "positive"),
    (dict(budget=math.nan), "positive"), (dict(seconds=math.inf), "positive"), (dict(keep=0), "at least 1"),
])
def test_a_bad_trial_option_is_one_clear_error_when_the_options_are_made(options, message):
    with pytest.raises(ExperimentError, match=message):
        TrialOptions(**options)
    with pytest.raises(ExperimentError, match="0 to 100"):  # a number of trials is checked the same way
        gradscope.diagnose(exploding_rnn(), steps=5, trials=-3)


def test_an_unclipped_reference_trained_for_the_trials_counts_in_their_cost():
    """At --steps 20 the profile is not the trials' 30 steps, so the reference is trained for them: the
    steps the trials report include it (the budget counts the clipped trials alone, as at --steps 30,
    so that the advice does not depend on --steps)."""
    report = gradscope.diagnose(exploding_rnn(), steps=20, seed=0)
    trials = report.recommendation.evidence.trials
    assert trials.reference_rerun and trials.reference.losses
    assert trials.spent == sum(len(t.losses) for t in trials.trials) + len(trials.reference.losses)
    doc = report.to_dict()
    assert doc["schema_version"] == 2 and doc["recommendation"]["trials"]["steps_spent"] == trials.spent
    assert doc["recommendation"]["trials"]["first_steps"] == trials.steps == 30
    assert f"({trials.spent} steps in all)" in " ".join(report.render().split())


def test_a_profile_that_went_non_finite_is_the_unclipped_reference_a_rerun_would_repeat():
    """A ResNet at SGD lr 20 goes non-finite within its 30-step profile (at step 23 on one machine; the step
    depends on the CPU's float kernels): that is the unclipped run on the trials' batches, so it is not
    trained again (its steps are not paid twice) and the trials stay within their budget; a profile that
    ends a few steps before the blow-up, wherever it came here, has the reference trained for the trials
    repeat it step for step (stopping sooner, at the blow-up, where a trial stops)."""
    report = gradscope.diagnose(hot_resnet(20.0), steps=30, seed=0)
    trials, m = report.recommendation.evidence.trials, report.statistics.model
    assert 6 <= m.steps < 30 and not math.isfinite(m.loss[-1])
    assert not trials.reference_rerun and trials.spent == sum(len(t.losses) for t in trials.trials)
    assert trials.spent <= TrialOptions().budget_steps
    assert "non-finite" in trials.reference.unstable and trials.winner is not None
    before = m.steps - 3  # finite: the profile stops at the first non-finite loss, three steps later
    rerun = gradscope.diagnose(hot_resnet(20.0), steps=before, seed=0).recommendation.evidence.trials
    assert rerun.reference_rerun and "blew up" in rerun.reference.unstable
    n = len(rerun.reference.losses)
    assert n < m.steps
    np.testing.assert_allclose(rerun.reference.losses, trials.reference.losses[:n], rtol=1e-5)


def test_the_winner_trains_where_unclipped_training_diverges(exploding):
    trials = exploding.recommendation.evidence.trials
    assert not trials.reference.stable
    winner = next(t for t in trials.trials if t.threshold == trials.winner)
    assert winner.stable and winner.held_out < 0.5 * trials.start_held_out


def test_unclipped_training_unstable_in_the_trials_is_an_error_finding(exploding):
    trials = exploding.recommendation.evidence.trials
    found = [f for f in exploding.findings if f.rule_id == "unclipped-unstable-in-trials"]
    assert not trials.reference.stable and len(found) == 1 and found[0].severity == "error"
    assert exploding.statistics.model.metrics["trial_unclipped_steps"] == len(trials.reference.losses)
    assert f"within {len(trials.reference.losses)} steps" in found[0].message
    assert exploding.statistics.model.metrics["trial_clipped_stable"] == sum(t.stable for t in trials.trials) > 0


@pytest.mark.parametrize("unstable, stable, fires", [(True, 2, True), (False, 2, False), (True, 0, False)])
def test_the_trials_outcome_decides_the_finding_and_the_exit_code(unstable, stable, fires):
    """Read beside a healthy profile: only an unclipped trial that failed where a clipped one held is an error."""
    from gradscope.analyse.profile import TrialOutcome
    from gradscope.gate import decide
    from gradscope.pipeline import build_report
    from gradscope.run.experiment import batch_stream
    experiment = healthy_mlp()
    monitor, stream = gradscope.Monitor(experiment.model), batch_stream(experiment.batches)
    for _ in range(12):
        experiment.optimizer.zero_grad()
        loss = experiment.loss_fn(experiment.model, next(stream))
        loss.backward()
        monitor.observe(loss)
        experiment.optimizer.step()
    profile = monitor.profile()
    monitor.close()
    assert build_report(profile).healthy
    report = build_report(dataclasses.replace(profile, trials=TrialOutcome(30, unstable, stable)))
    assert any(f.rule_id == "unclipped-unstable-in-trials" for f in report.findings) == fires
    assert report.healthy != fires and (decide(report, "error", None).exit_code == 1) == fires


@pytest.mark.parametrize("make, adaptive", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), False),
    (lambda p: torch.optim.ASGD(p, lr=0.1), False),
    (lambda p: torch.optim.Adam(p), True),
    (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9), True),  # has momentum, but divides by a running mean
    (lambda p: torch.optim.Adagrad(p), True),
    (lambda p: torch.optim.Adadelta(p), True),
    (lambda p: torch.optim.Rprop(p), True),
])
def test_only_an_sgd_style_optimizer_gets_an_update_ratio_estimate(make, adaptive):
    """The estimate bounds lr_eff x threshold; an optimizer that normalises its step has no such bound."""
    from gradscope.run.diagnose import _update_scale
    experiment = healthy_mlp()
    experiment.optimizer = make(experiment.model.parameters())
    scale = _update_scale(experiment)
    assert (scale is None) == adaptive
    if not adaptive and isinstance(experiment.optimizer, torch.optim.SGD):  # lr 0.1 / (1 - 0.9) = 1
        norm = float(torch.cat([p.detach().flatten() for p in experiment.model.parameters()]).norm())
        assert scale == pytest.approx(judge.UPDATE_RATIO * norm, rel=1e-5)


def test_a_healthy_model_runs_no_trial_and_is_not_told_to_clip():
    report = gradscope.diagnose(healthy_mlp(), steps=30, seed=0)
    assert report.recommendation.method == "none" and report.recommendation.evidence.trials is None


def test_diagnose_with_trials_restores_the_model():
    experiment = exploding_rnn()
    before = {k: v.clone() for k, v in experiment.model.state_dict().items()}
    report = gradscope.diagnose(experiment, steps=20, seed=0)
    assert report.recommendation.evidence.trials is not None
    after = experiment.model.state_dict()
    assert all(torch_equal(before[k], after[k]) for k in before)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


# -- detection and stability of the advice on an early blow-up -------------------------------------------------
def test_an_early_blow_up_is_flagged_though_the_quarters_hide_it():
    """A GRU at SGD lr 50: the loss blows up by step 3, so the first quarter already holds the blow-up."""
    report = gradscope.diagnose(hot_gru(50.0), steps=30, seed=0, trials=0)
    m = report.statistics.model.metrics
    assert m["loss_rise"] < 2.0  # last quarter over first quarter misses it
    assert m["loss_peak_over_start"] > 10 and m["loss_last_over_start"] > 2
    assert "loss-diverging" in {f.rule_id for f in report.findings} and not report.healthy


def test_the_advice_holds_across_profile_lengths():
    thresholds = [gradscope.diagnose(hot_gru(5.0), steps=n, seed=0).recommendation.threshold
                  for n in (10, 20, 30, 40, 50)]
    assert all(t is not None for t in thresholds)
    assert max(thresholds) / min(thresholds) <= 3.0, thresholds


# -- the command line ---------------------------------------------------------------------------------------
SAMPLE = "samples/exploding_rnn.py"


def test_cli_trials_in_json_and_off(capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parent.parent)
    assert main(["diagnose", SAMPLE, "--trials", "3", "--format", "json"]) == 1
    rec = json.loads(capsys.readouterr().out)["recommendation"]
    trials = rec["trials"]
    assert rec["threshold"] == trials["winner"] and trials["runs"][0]["threshold"] is None
    assert 1 <= len(trials["runs"]) - 1 <= 3 and all("held_out_loss" in r and "stable" in r for r in trials["runs"])
    assert main(["diagnose", SAMPLE, "--trials", "off", "--format", "json"]) == 1
    rec = json.loads(capsys.readouterr().out)["recommendation"]
    assert rec["trials"] is None and "no trial ran" in rec["evidence"]["basis"]


@pytest.mark.parametrize("flag", [["--trials", "many"], ["--trials", "-1"], ["--trial-budget", "0"],
                                  ["--trial-budget", "nan"], ["--trial-seconds", "inf"], ["--trial-steps", "3"],
                                  ["--trial-steps", "2.5"], ["--trial-steps", "100000"]])
def test_cli_rejects_bad_trial_options(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["diagnose", SAMPLE, *flag])
    assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_the_documented_trial_options_example_runs_as_written():
    from pathlib import Path
    page = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in page.split("```python\n")[1:]]
    example = next(b for b in blocks if "from gradscope import TrialOptions" in b)
    namespace: dict = {}
    exec(compile(example, "docs/python-api.md", "exec"), namespace)
    assert namespace["TrialOptions"] is TrialOptions and TrialOptions().budget == 13.0
    assert TrialOptions(steps=120).first_steps == 120 and not TrialOptions(steps=120).adaptive


class _OddParameters(torch.nn.Module):
    """The exploding RNN's task, with a complex gain, a zero-element parameter and a frozen layer beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.RNN(2, 32, batch_first=True, nonlinearity="tanh")
        self.head = torch.nn.Linear(32, 1)
        self.frozen = torch.nn.Linear(32, 1).requires_grad_(False)
        self.gain = torch.nn.Parameter(torch.tensor(1.0 + 0.5j))
        self.empty = torch.nn.Parameter(torch.empty(0))
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(4.0)  # a spectral radius well above 1: the gradients explode

    def forward(self, x, target):
        h = self.rnn(x)[0][:, -1]
        out = self.head(h) * self.gain.abs() + 0.1 * self.frozen(h) + self.empty.sum()
        return torch.nn.functional.mse_loss(out, target.reshape(out.shape))


def test_trials_clip_complex_zero_element_and_frozen_parameters_as_the_profile_measures_them():
    """Every trial starts where the profile did, on the same batch: its first pre-clip global norm is the
    profile's, whatever kinds of parameter the model holds (a complex one counts |g|^2)."""
    base = exploding_rnn()
    torch.manual_seed(0)
    model = _OddParameters()
    experiment = gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=0.5), base.batches)
    import warnings
    with warnings.catch_warnings():  # a complex parameter cast to float ("discards the imaginary part") fails
        warnings.simplefilter("error", UserWarning)
        report = gradscope.diagnose(experiment, steps=30, seed=0)
    trials = report.recommendation.evidence.trials
    assert trials is not None and trials.trials, [f.rule_id for f in report.findings]
    first = report.statistics.model.global_norm[0]
    for t in trials.trials:
        assert t.norms[0] == pytest.approx(first, rel=1e-5)


def test_complex_empty_and_frozen_parameters_reach_the_trials():
    from models import every_kind
    experiment = every_kind()
    model = experiment.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = gradscope.diagnose(experiment, steps=30, trials=4)
    assert report.recommendation.evidence.trials is not None and report.recommendation.method == "norm"
    assert report.recommendation.evidence.trials.winner is not None
    for name, p in model.named_parameters():  # put back as found: values, dtype, no gradient on the frozen
        assert p.dtype == before[name].dtype and torch.equal(p.detach(), before[name]), name
    assert model.frozen.weight.grad is None and model.phase.dtype == torch.cfloat
