"""gradscope sweep: candidates from the profile, trials from one start, ranking, and --sweep folding."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gradscope
from gradscope.cli import main
from gradscope.sweep import candidates, fold, run_sweep

from models import exploding_rnn

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = str(ROOT / "samples" / "exploding_rnn.py")


@pytest.fixture(scope="module")
def profiled():
    return gradscope.diagnose(exploding_rnn(), steps=20, seed=0)


def test_candidates_span_the_observed_norms(profiled):
    values = candidates(profiled)
    norms = profiled.statistics.model.global_norm
    assert 4 <= len(values) <= 6 and values == sorted(values)
    assert values[0] < norms.min() and values[-1] > float(sorted(norms)[len(norms) // 2])
    assert all(b > 1.2 * a for a, b in zip(values, values[1:]))


def test_trials_share_one_start_and_the_winner_trains(profiled):
    result = run_sweep(exploding_rnn, candidates(profiled), steps=20, seed=0)
    first = {t.first_loss for t in result.trials}
    assert len(first) == 1  # same weights, data and RNG for every trial
    assert len(result.trials) == len(candidates(profiled)) + 1
    assert result.unclipped.diverged
    winner = result.winner
    assert winner is not None and not winner.diverged and winner.final_loss < winner.first_loss
    assert result.trials[0] is winner


def test_fold_puts_the_winner_into_the_recommendation(profiled):
    result = run_sweep(exploding_rnn, candidates(profiled), steps=20, seed=0)
    folded = fold(profiled, result)
    assert folded.recommendation.method == "norm" and folded.recommendation.threshold == result.winner.threshold
    assert "sweep of" in folded.recommendation.evidence.basis
    assert f"max_norm={result.winner.threshold:.3g}" in folded.recommendation.snippets["torch"]


def test_cli_sweep_and_diagnose_sweep(capsys):
    assert main(["sweep", SAMPLE, "--steps", "20", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["winner"] is not None and doc["trials"][0]["threshold"] == doc["winner"]
    assert main(["diagnose", SAMPLE, "--steps", "20", "--sweep", "--format", "json"]) == 1
    rec = json.loads(capsys.readouterr().out)["recommendation"]
    assert rec["threshold"] == doc["winner"] and "sweep of" in rec["evidence"]["basis"]


@pytest.mark.slow
def test_sweep_on_the_lstm_language_model_picks_a_threshold_that_trains():
    result = subprocess.run([sys.executable, "-m", "gradscope", "sweep", "samples/lstm_lm.py", "--format", "json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    best = doc["trials"][0]
    unclipped = next(t for t in doc["trials"] if t["threshold"] is None)
    assert best["threshold"] == doc["winner"] and not best["diverged"]
    assert best["final_loss"] < best["first_loss"]
    assert unclipped["diverged"] or best["final_loss"] < unclipped["final_loss"]
