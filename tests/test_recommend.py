"""Clipping advice from real runs: method by pathology, scale-aware thresholds, evidence that adds up."""
from __future__ import annotations

import numpy as np
import pytest

import gradscope
from gradscope.present.wording import say

from models import exploding_rnn, healthy_mlp
from test_default_rules import dominating_layer, healthy_sgd, spiky_batches



def run(experiment, steps=30, **options):
    return gradscope.diagnose(experiment, steps=steps, seed=0, **options)


def test_healthy_model_gets_none_with_a_generous_safety_net():
    report = run(healthy_sgd())
    rec = report.recommendation
    assert rec.method == "none" and rec.threshold is None and rec.snippets == {} and rec.guard is None
    assert rec.evidence.safety_net >= 5 * report.statistics.model.metrics["global_norm_max"]
    assert rec.evidence.clip_fraction == 0.0


def test_a_healthy_adam_run_gets_the_skip_guard_beside_its_safety_net():
    report = run(healthy_mlp())
    rec = report.recommendation
    assert report.healthy and rec.method == "none" and rec.threshold is None
    assert rec.guard is not None and rec.guard.reasons == ("adaptive-optimizer-outliers",)
    assert rec.guard.skip == gradscope.Skip() and rec.guard.would_skip == () and rec.guard.judged == 30 - 16
    assert f'Clipper("none", None, safety_net={rec.evidence.safety_net:.3g}, skip=gradscope.Skip()).attach(optimizer)' \
        in rec.snippets["torch"]
    assert "ClipperCallback(clipper)" in rec.snippets["lightning"] and "max_grad_norm=0" in rec.snippets["huggingface"]
    assert "no clipping needed, with the skip-step guard" in report.render()
    assert "0 of 30 profiled steps" in " ".join(report.render().split())
    doc = report.to_dict()["recommendation"]["guard"]
    assert doc["kind"] == "skip" and doc["z"] == 6 and doc["window"] == 128 and doc["would_skip"] == []


def test_the_guard_counts_the_profiled_steps_it_would_have_skipped():
    """Step 20's batch has targets 300x: the guard, replayed on the profile, names that step."""
    report = run(spiky_batches(), trials=0)  # under Adam
    assert report.recommendation.guard.would_skip == (20,)
    assert "would have skipped 1 (step 20)" in say(report.recommendation.guard.basis)


def test_advice_scales_with_the_model_norm():
    """A healthy model whose norms sit near 1e3 must not be told 1.0."""
    small, large = run(healthy_mlp()), run(healthy_mlp(loss_scale=1e3))
    assert large.statistics.model.metrics["global_norm_median"] > 300
    assert large.recommendation.method == "none"
    assert large.recommendation.evidence.safety_net == pytest.approx(1e3 * small.recommendation.evidence.safety_net,
                                                                     rel=0.1)


def test_without_trials_an_explosion_gets_a_tenth_of_the_start_norm():
    report = run(exploding_rnn(), trials=0)
    rec = report.recommendation
    norms = report.statistics.model.global_norm
    assert rec.method == "norm" and rec.evidence.trials is None
    assert rec.threshold == pytest.approx(0.1 * float(np.median(norms[:3])), rel=0.05)  # two significant digits
    assert rec.evidence.clip_fraction == pytest.approx(np.mean(norms > rec.threshold))
    assert "no trial ran" in say(rec.evidence.basis)
    assert "global-norm-growing" in rec.evidence.reasons
    assert "max_norm=" in rec.snippets["torch"] and 'gradient_clip_algorithm="norm"' in rec.snippets["lightning"]
    assert "max_grad_norm=" in rec.snippets["huggingface"] and "--clip-mode norm" in rec.snippets["timm"]


def test_with_trials_an_explosion_gets_the_judged_winner():
    report = run(exploding_rnn())
    rec, trials = report.recommendation, report.recommendation.evidence.trials
    assert rec.method == "norm" and trials is not None and rec.threshold == trials.winner
    winner = next(t for t in trials.trials if t.threshold == trials.winner)
    assert winner.stable and winner.held_out < trials.start_held_out
    assert not trials.reference.stable  # the unclipped profile itself diverged
    assert rec.evidence.clip_fraction == pytest.approx(winner.clip_fraction)
    assert "held-out" in say(rec.evidence.basis)


def test_spike_gets_norm_clipping_above_the_typical_norm_without_trials():
    report = run(spiky_batches(), trials=0)
    rec = report.recommendation
    norms = report.statistics.model.global_norm
    assert rec.method == "norm"
    assert np.median(norms) < rec.threshold < norms.max()
    assert 0 < rec.evidence.clip_fraction < 0.2  # the spike, not ordinary steps


def test_a_dominating_layer_alone_is_no_reason_to_clip():
    report = run(dominating_layer())
    assert "layer-dominates" in {f.rule_id for f in report.findings}
    assert report.healthy and report.recommendation.method == "none"


def test_a_rule_that_names_agc_at_warning_makes_the_advice_agc(tmp_path):
    """The method follows the rules: promote layer-dominates (remedy agc) to a warning and the advice is AGC."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nrules:\n  - id: layer-dominates\n    severity: warning\n")
    report = run(dominating_layer(), rules=str(rules))
    rec = report.recommendation
    assert "layer-dominates" in rec.evidence.reasons
    assert rec.method == "agc" and 0 < rec.threshold <= 1
    assert "hidden.0" in say(rec.evidence.basis)
    assert 'gradscope.Clipper("agc", ' in rec.snippets["torch"]  # Adam: AGC beside the skip guard, in one Clipper


def test_rule_params_change_the_advice_not_only_the_findings(tmp_path):
    """Raising the spike rule's bar past what the run shows removes the call for clipping, and so the advice."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nrules:\n  - id: gradient-spike\n    params: {z: 1000.0}\n")
    default, relaxed = run(spiky_batches(), trials=0), run(spiky_batches(), trials=0, rules=str(rules))
    assert default.recommendation.method == "norm" and "gradient-spike" in default.recommendation.evidence.reasons
    assert "gradient-spike" not in {f.rule_id for f in relaxed.findings}
    assert relaxed.recommendation.method == "none"


def test_outliers_that_recur_often_are_data_and_the_guard_stays_off(tmp_path):
    """From step 20 on, one batch in 8 with targets x300 under Adam: the guard would skip one step in 8,
    far more than 1 in 36, so it is not armed; the report says why, and the Clipper leaves it off."""
    import torch
    from models import MLP, mse, regression_batches
    torch.manual_seed(0)
    model = MLP()
    plain = regression_batches()
    steps = iter(range(10 ** 6))

    def batch():
        x, y = plain()
        step = next(steps)
        return (x, y * 300) if step >= 20 and step % 8 == 4 else (x, y)
    experiment = gradscope.Experiment(model, torch.optim.Adam(model.parameters(), lr=1e-3), batch, loss_fn=mse)
    report = gradscope.diagnose(experiment, steps=50, seed=0, trials=0)
    guard = report.recommendation.guard
    assert guard is not None and not guard.armed and len(guard.would_skip) >= 2
    assert "Not armed" in say(guard.basis) and guard.basis[-1].code == "guard_not_armed" and "with the skip-step guard" not in report.render()
    assert gradscope.Clipper.from_report(report).skip is None
    assert "Skip" not in " ".join(report.recommendation.snippets.values())
    path = tmp_path / "r.json"
    path.write_text(report.to_json())
    assert report.to_dict()["recommendation"]["guard"]["armed"] is False
    assert gradscope.Clipper.from_json(path).skip is None
