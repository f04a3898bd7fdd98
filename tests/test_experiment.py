"""The Experiment contract and what diagnose() restores on the user's objects."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import ProfileOptions
from gradscope.errors import ExperimentError
from gradscope.run.experiment import batch_stream, compute_loss

from models import MLP, exploding_rnn, healthy_mlp


def test_lists_cycle_generators_are_cached_and_callables_are_called():
    assert list(itertools.islice(batch_stream([1, 2]), 5)) == [1, 2, 1, 2, 1]
    assert list(itertools.islice(batch_stream(x for x in (7, 8)), 5)) == [7, 8, 7, 8, 7]
    counter = itertools.count()
    assert list(itertools.islice(batch_stream(lambda: next(counter)), 3)) == [0, 1, 2]
    dataloader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(3.0)), batch_size=2)
    assert len(list(itertools.islice(batch_stream(dataloader), 4))) == 4


@pytest.mark.parametrize("empty", [[], (x for x in ())])
def test_empty_batches_are_a_clear_error(empty):
    with pytest.raises(ExperimentError, match="empty"):
        next(batch_stream(empty))


@dataclass
class Output:
    """Like a Hugging Face ModelOutput: an object with a .loss."""
    loss: Optional[torch.Tensor]
    logits: torch.Tensor


class HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Output:
        logits = self.lin(input_ids)
        return Output(None if labels is None else nn.functional.cross_entropy(logits, labels), logits)


def test_dict_batches_use_the_output_loss():
    model = HFStyle()
    exp = gradscope.Experiment(model, torch.optim.SGD(model.parameters(), 0.1),
                               [{"input_ids": torch.randn(5, 4), "labels": torch.tensor([0, 1, 2, 0, 1])}])
    report = gradscope.diagnose(exp, steps=3, profile=ProfileOptions(extend=False))
    assert report.statistics.model.steps == 3 and np.isfinite(report.statistics.model.loss).all()
    with pytest.raises(ExperimentError, match="computed no loss"):
        compute_loss(exp, {"input_ids": torch.randn(5, 4)})


def test_tuple_batches_go_to_the_model_and_the_output_must_be_scalar():
    model = nn.Linear(4, 1)
    exp = gradscope.Experiment(model, torch.optim.SGD(model.parameters(), 0.1), [(torch.randn(2, 4),)])
    with pytest.raises(ExperimentError, match=r"model\(\*batch\) returned a tensor of shape \(2, 1\)"):
        compute_loss(exp, (torch.randn(2, 4),))


def test_wrong_field_types_are_clear_errors():
    with pytest.raises(ExperimentError, match="not a torch.nn.Module"):
        gradscope.Experiment("model", None, [])
    with pytest.raises(ExperimentError, match="not a torch.optim.Optimizer"):
        gradscope.Experiment(nn.Linear(1, 1), "adam", [])


def test_diagnose_restores_weights_optimizer_modes_and_rng():
    exp = healthy_mlp()
    exp.model.eval()
    exp.model.out.train()
    exp.model(torch.randn(2, 8)).sum().backward()
    exp.optimizer.step()
    weights = {k: v.clone() for k, v in exp.model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in exp.model.named_parameters()}
    opt_state = exp.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    torch.manual_seed(123)
    random.seed(5)
    expected = (torch.rand(1), random.random())
    torch.manual_seed(123)
    random.seed(5)
    gradscope.diagnose(exp, steps=5)
    assert (torch.rand(1), random.random()) == expected
    for k, v in exp.model.state_dict().items():
        assert torch.equal(v, weights[k])
    for n, p in exp.model.named_parameters():
        assert torch.equal(p.grad, grads[n])
    assert torch.equal(exp.optimizer.state_dict()["state"][0]["exp_avg"], opt_state)
    assert not exp.model.training and exp.model.out.training
    assert all(not p._post_accumulate_grad_hooks for p in exp.model.parameters())


# -- a learning-rate scheduler ----------------------------------------------------------------------------
def _warm_up(exp: gradscope.Experiment, steps: int = 10) -> gradscope.Experiment:
    exp.scheduler = torch.optim.lr_scheduler.LambdaLR(exp.optimizer, lambda k: min(1.0, (k + 1) / steps))
    return exp


def test_a_scheduler_steps_with_the_optimizer_and_is_put_back():
    exp = _warm_up(healthy_mlp(lr=1e-2))
    assert exp.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # the warm-up's first step
    report = gradscope.diagnose(exp, steps=6, profile=ProfileOptions(extend=False))
    assert report.statistics.model.steps == 6
    assert exp.scheduler.last_epoch == 0 and exp.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    gradscope.diagnose(exp, steps=6, profile=ProfileOptions(extend=False, restore=False))
    assert exp.scheduler.last_epoch == 6 and exp.optimizer.param_groups[0]["lr"] == pytest.approx(7e-3)


def test_every_trial_starts_from_the_schedule_s_start():
    """OneCycleLR raises once stepped past total_steps. At a constant rate (div factors 1) it leaves the
    exploding RNN exploding; 40 steps cover the 30-step profile or any one 30-step trial, not two
    trials run back to back, so several trials pass only if each starts from the schedule's start."""
    exp = exploding_rnn()
    exp.scheduler = torch.optim.lr_scheduler.OneCycleLR(exp.optimizer, max_lr=0.05, total_steps=40,
                                                        div_factor=1.0, final_div_factor=1.0)
    trials = gradscope.diagnose(exp, steps=30, seed=0).recommendation.evidence.trials
    assert trials is not None and len(trials.trials) >= 2 and trials.winner is not None
    assert exp.scheduler.last_epoch == 0


def test_a_scheduler_that_gradscope_cannot_step_is_a_clear_error():
    exp = healthy_mlp()
    other = torch.optim.SGD(exp.model.parameters(), lr=0.1)
    with pytest.raises(ExperimentError, match="schedules another optimizer"):
        gradscope.Experiment(exp.model, exp.optimizer, exp.batches, exp.loss_fn,
                             scheduler=torch.optim.lr_scheduler.StepLR(other, 10))
    with pytest.raises(ExperimentError, match="ReduceLROnPlateau"):
        gradscope.Experiment(exp.model, exp.optimizer, exp.batches, exp.loss_fn,
                             scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(exp.optimizer))
    with pytest.raises(ExperimentError, match="not a learning-rate scheduler"):
        gradscope.Experiment(exp.model, exp.optimizer, exp.batches, exp.loss_fn, scheduler="cosine")
    short = gradscope.Experiment(exp.model, exp.optimizer, exp.batches, exp.loss_fn,
                                 scheduler=torch.optim.lr_scheduler.OneCycleLR(exp.optimizer, 0.01, total_steps=3))
    with pytest.raises(ExperimentError, match=r"scheduler.step\(\) raised at step 3: ValueError"):
        gradscope.diagnose(short, steps=5)


def test_diagnose_without_restore_leaves_the_trained_model():
    exp = healthy_mlp()
    before = exp.model.out.weight.detach().clone()
    gradscope.diagnose(exp, steps=3, profile=ProfileOptions(restore=False))
    assert not torch.equal(before, exp.model.out.weight)


def test_steps_out_of_range_is_a_clear_error():
    with pytest.raises(ExperimentError, match="between 1 and 50"):
        gradscope.diagnose(healthy_mlp(), steps=51)


def test_monitor_report_equals_diagnose_report():
    """The Monitor in a user's own loop gives the same Report as diagnose on the same steps."""
    first = gradscope.diagnose(healthy_mlp(), steps=6, seed=1, profile=ProfileOptions(restore=False))
    exp = healthy_mlp()
    from gradscope.run.diagnose import seed_everything
    from gradscope.run.experiment import batch_stream
    seed_everything(1)
    monitor = gradscope.Monitor(exp.model, update_every=1, histogram_sample=1, histogram_every=1,
                                optimizer=exp.optimizer)
    stream = batch_stream(exp.batches)
    for _ in range(6):
        exp.optimizer.zero_grad(set_to_none=True)
        loss = exp.loss_fn(exp.model, next(stream))
        loss.backward()
        monitor.observe(loss)
        exp.optimizer.step()
    second = monitor.report(name="healthy_mlp")
    assert second.to_dict()["layers"] == first.to_dict()["layers"]
    assert second.to_dict()["global"] == first.to_dict()["global"]
    assert second.findings == first.findings and second.recommendation == first.recommendation


def test_unused_model_parameter_does_not_crash_diagnose():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = MLP(), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)
    model = Partial()
    exp = gradscope.Experiment(model, torch.optim.SGD(model.parameters(), 0.01),
                               [(torch.randn(4, 8), torch.randn(4, 1))],
                               loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    report = gradscope.diagnose(exp, steps=3)
    assert next(l for l in report.statistics.layers if l.name == "unused").status == "unused"
