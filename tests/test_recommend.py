"""Clipping advice from real runs: method by pathology, scale-aware thresholds, evidence that adds up."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import gradscope

from models import exploding_rnn, healthy_mlp
from test_default_rules import dominating_layer, spiky_batches


def run(experiment, steps=30):
    return gradscope.diagnose(experiment, steps=steps, seed=0)


def test_healthy_model_gets_none_with_a_generous_safety_net():
    report = run(healthy_mlp())
    rec = report.recommendation
    assert rec.method == "none" and rec.threshold is None and rec.snippets == {}
    assert rec.evidence.safety_net >= 5 * report.statistics.model.metrics["global_norm_max"]
    assert rec.evidence.clip_fraction == 0.0


def test_advice_scales_with_the_model_norm():
    """A healthy model whose norms sit near 1e3 must not be told 1.0."""
    small, large = run(healthy_mlp()), run(healthy_mlp(loss_scale=1e3))
    assert large.statistics.model.metrics["global_norm_median"] > 300
    assert large.recommendation.method == "none"
    assert large.recommendation.evidence.safety_net == pytest.approx(1e3 * small.recommendation.evidence.safety_net,
                                                                     rel=0.1)


def test_explosion_gets_norm_clipping_at_the_early_level():
    report = run(exploding_rnn())
    rec = report.recommendation
    norms = report.statistics.model.global_norm
    early = float(np.median(norms[:max(3, len(norms) // 4)]))
    assert rec.method == "norm"
    assert rec.threshold == pytest.approx(0.1 * early, rel=0.05)  # two significant digits
    assert rec.evidence.clip_fraction == pytest.approx(np.mean(norms > rec.threshold))
    assert "global-norm-growing" in rec.evidence.reasons
    assert "max_norm=" in rec.snippets["torch"] and 'gradient_clip_algorithm="norm"' in rec.snippets["lightning"]
    assert "max_grad_norm=" in rec.snippets["huggingface"] and "--clip-mode norm" in rec.snippets["timm"]


def test_spike_gets_norm_clipping_above_the_typical_norm():
    report = run(spiky_batches())
    rec = report.recommendation
    norms = report.statistics.model.global_norm
    assert rec.method == "norm"
    assert np.median(norms) < rec.threshold < norms.max()
    assert 0 < rec.evidence.clip_fraction < 0.2  # the spike, not ordinary steps


def test_a_dominating_layer_alone_is_no_reason_to_clip():
    report = run(dominating_layer())
    assert "layer-dominates" in {f.rule_id for f in report.findings}
    assert report.healthy and report.recommendation.method == "none"


def test_spikes_with_a_dominating_layer_get_agc():
    """When clipping is called for and one layer dominates, norm clipping would starve the others."""
    experiment = dominating_layer()
    plain = experiment.batches
    counter = itertools.count()

    def batch():
        x, y = plain()
        return (x, y * 300) if next(counter) == 20 else (x, y)
    report = run(gradscope.Experiment(experiment.model, experiment.optimizer, batch, loss_fn=experiment.loss_fn))
    rec = report.recommendation
    assert "gradient-spike" in rec.evidence.reasons
    assert rec.method == "agc" and 0 < rec.threshold <= 1
    assert "hidden.0" in rec.evidence.basis
    assert "--clip-mode agc" in rec.snippets["timm"]
