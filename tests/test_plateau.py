"""A profile that has seen nothing yet goes on: a flat loss and no finding extend it, up to EXTEND x --steps."""
from __future__ import annotations

import json

import torch
from torch import nn

import gradscope
from gradscope.present.wording import say
from gradscope import ProfileOptions
from gradscope.cli import main
from gradscope.run.diagnose import EXTEND

from models import healthy_mlp


class Plateau(nn.Module):
    """A flat loss over batch noise, and one stiff direction started 1e-9 off its minimum, where SGD at lr 2.5
    overshoots: its gradient grows x1.5 a step, hidden under the noise for some 50 steps, then diverges."""

    def __init__(self) -> None:
        super().__init__()
        self.noise = nn.Linear(8, 1, bias=False)
        self.stiff = nn.Parameter(torch.ones(8))
        with torch.no_grad():
            self.stiff[0] = 1e-9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 + 0.01 * self.noise(x).mean() + 0.5 * self.stiff[0] ** 2


def plateau(lr: float = 2.5) -> gradscope.Experiment:
    """At lr 2.5 the stiff direction diverges after the plateau; at lr 1.5 it shrinks x0.5 a step: a plateau only."""
    torch.manual_seed(0)
    model = Plateau()
    g = torch.Generator().manual_seed(0)
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=lr),
                                lambda: (torch.randn(16, 8, generator=g),), loss_fn=lambda m, b: m(b[0]))


def test_a_plateau_that_diverges_later_is_profiled_until_it_shows():
    short = gradscope.diagnose(plateau(), steps=30, trials=0, profile=ProfileOptions(extend=False))
    assert short.healthy and short.statistics.model.steps == 30 and short.extended is None
    report = gradscope.diagnose(plateau(), steps=30, trials=0)
    assert report.statistics.model.steps == 60 and report.extended.code == "profile_extended" and "went on to 60" in say(report.extended)
    assert "loss-diverging" in {f.rule_id for f in report.findings}
    assert report.recommendation.method == "norm"


def test_the_trials_advice_for_the_late_divergence_holds_past_it():
    report = gradscope.diagnose(plateau(), steps=30)
    assert report.recommendation.evidence.trials is not None
    exp = plateau()
    clipper = gradscope.Clipper.from_report(report)
    for _ in range(150):  # unclipped, the loss passes 10 by step 60
        exp.optimizer.zero_grad()
        loss = exp.loss_fn(exp.model, exp.batches())
        loss.backward()
        clipper(exp.model)
        exp.optimizer.step()
    assert loss.item() < 1.1


def test_a_flat_run_that_never_shows_anything_stops_at_the_limit():
    report = gradscope.diagnose(plateau(lr=1.5), steps=10, trials=0)
    assert report.healthy and report.statistics.model.steps == EXTEND * 10 and report.extended


def test_a_learning_model_is_not_extended():
    report = gradscope.diagnose(healthy_mlp(), steps=30)
    assert report.statistics.model.steps == 30 and report.extended is None


def test_the_cli_says_why_and_no_extend_turns_it_off(tmp_path, capsys):
    path = tmp_path / "plateau_target.py"
    path.write_text("from test_plateau import plateau\n\ndef experiment():\n    return plateau(lr=1.5)\n")
    assert main(["diagnose", str(path), "--steps", "5", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"] == 20 and doc["steps_requested"] == 5 and "went on to 20" in doc["extended"] and doc["extended_because"][0]["steps"] == 20
    assert main(["diagnose", str(path), "--steps", "5", "--no-extend"]) == 0
    out = capsys.readouterr().out
    assert "5 steps on cpu" in out and "asked" not in out
    assert main(["diagnose", str(path), "--steps", "5"]) == 0
    assert "20 steps (5 asked; the loss had not moved, so the profile went on)" in capsys.readouterr().out
    assert main(["diagnose", str(path), "--steps", "5", "--format", "markdown"]) == 0
    assert "20 steps on cpu" in (out := capsys.readouterr().out) and "The profile went on: after 5 steps" in out
