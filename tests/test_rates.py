"""The learning-rate schedule read ahead, and a report that says when the run never reached its peak."""
from __future__ import annotations

import json

import pytest
import torch

import gradscope
from gradscope import ProfileOptions
from gradscope.present.formats import to_markdown
from gradscope.gate import decide
from gradscope.run.rates import ahead
from gradscope.present.wording import say

from models import healthy_mlp, noise_targets


def _warm_cosine(exp: gradscope.Experiment, warmup: int, total: int = 1500) -> gradscope.Experiment:
    from transformers import get_cosine_schedule_with_warmup
    exp.scheduler = get_cosine_schedule_with_warmup(exp.optimizer, num_warmup_steps=warmup, num_training_steps=total)
    return exp


def test_reading_ahead_gives_the_schedule_s_rates_and_puts_everything_back():
    exp = _warm_cosine(healthy_mlp(lr=1e-2), warmup=100)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in exp.optimizer.param_groups]
    state = exp.scheduler.state_dict()
    rates = ahead(exp, 400)
    assert [{k: v for k, v in g.items() if k != "params"} for g in exp.optimizer.param_groups] == groups
    assert exp.scheduler.state_dict() == state
    # a naive reference: the warm-up's linear ramp, then the cosine, from the formula itself
    assert rates[0] == 0.0 and rates[50] == pytest.approx(0.5e-2) and max(rates) == pytest.approx(1e-2)
    assert rates.index(max(rates)) == 100 and rates[399] < rates[100]
    assert ahead(healthy_mlp()) == []  # no scheduler, nothing to read


def test_a_schedule_that_ends_ends_the_look_ahead_and_the_trials():
    """OneCycleLR raises once stepped past total_steps. Nothing learns on noise targets, so the contenders
    would go on to 60 and 120 steps; a 50-step schedule stops them at 30, where stepping on would raise."""
    exp = noise_targets()
    exp.scheduler = torch.optim.lr_scheduler.OneCycleLR(exp.optimizer, max_lr=2.0, total_steps=50,
                                                        div_factor=1.0, final_div_factor=1.0)
    assert len(ahead(exp)) == 51 and exp.scheduler.last_epoch == 0  # the rates of 50 steps, and the one after
    trials = gradscope.diagnose(exp, steps=30, seed=0).recommendation.evidence.trials
    assert trials is not None and trials.longest == 30
    assert "would pass the longest trial allowed, 50" in say(trials.stopped)


def test_a_profile_inside_the_warm_up_says_it_never_saw_the_peak_rate():
    """AdamW with a 100-step warm-up: the 30-step profile trains at up to 29% of the peak rate."""
    exp = _warm_cosine(healthy_mlp(lr=1e-2), warmup=100)
    report = gradscope.diagnose(exp, steps=30, seed=0, profile=ProfileOptions(extend=False))
    reach = report.schedule
    assert reach is not None and not reach.reached
    assert reach.peak_step == 100 and reach.peak_lr == pytest.approx(1e-2)
    assert reach.profile_steps == 30 and reach.profile_lr == pytest.approx(29 / 100 * 1e-2)
    text = " ".join(report.render(width=100).split())
    assert "peaks at 0.01 at step 101; the profile's 30 steps reached 29% of it" in text
    assert "has not seen the run at its peak rate" in text
    doc = json.loads(report.to_json())
    assert doc["schedule"]["reached"] is False and doc["schedule"]["peak_step"] == 100
    assert "**Learning rate:**" in to_markdown(report, decide(report, "error"))
    pytest.importorskip("matplotlib")
    from gradscope.present.formats import FORMATS
    assert "The learning-rate schedule peaks at 0.01" in FORMATS["html"](report, decide(report, "error"))


def test_a_profile_past_the_warm_up_says_nothing_of_it():
    report = gradscope.diagnose(_warm_cosine(healthy_mlp(lr=1e-2), warmup=10), steps=30, seed=0,
                                profile=ProfileOptions(extend=False))
    assert report.schedule is not None and report.schedule.reached
    assert "peak rate" not in report.render() and json.loads(report.to_json())["schedule"]["reached"] is True
    plain = gradscope.diagnose(healthy_mlp(), steps=5, seed=0)
    assert plain.schedule is None and json.loads(plain.to_json())["schedule"] is None


def test_a_profile_inside_the_warm_up_goes_on_through_it_to_the_peak():
    """The same 100-step warm-up, profiled as asked (30 steps at a time): on to 120 steps, past the peak."""
    report = gradscope.diagnose(_warm_cosine(healthy_mlp(lr=1e-2), warmup=100), steps=30, seed=0, trials=0)
    assert report.statistics.model.steps == 120 and report.extended.code == "profile_to_peak"
    assert "peaks at step 101, after the 30 steps asked for, so the profile went on through the warm-up to 120" \
        in say(report.extended)
    assert report.schedule.reached and "peak rate" not in report.render()
    assert "on through the warm-up" in " ".join(report.render(width=100).split())


def test_a_warm_up_longer_than_the_extension_is_followed_as_far_as_it_goes_and_said_so():
    from gradscope.run.diagnose import EXTEND
    report = gradscope.diagnose(_warm_cosine(healthy_mlp(lr=1e-2), warmup=1000), steps=20, seed=0, trials=0)
    assert report.statistics.model.steps == EXTEND * 20 and report.extended.code == "profile_to_peak"
    assert not report.schedule.reached and "has not seen the run at its peak rate" in " ".join(report.render().split())
