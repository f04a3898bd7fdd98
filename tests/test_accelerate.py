"""GradscopeAccelerate against a real accelerate.Accelerator on CPU: pre-clip norms under accumulation,
the report written on the main process, fail_on, and a partial report when the loop raises."""
from __future__ import annotations


import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")

from gradscope.integrations.accelerate import GradientHealthError, GradscopeAccelerate  # noqa: E402
from gradscope.report import Report

from models import MLP  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """The accelerator's state is process-wide; each test starts its own."""
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def loader(n: int = 80, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x @ torch.randn(8, 1, generator=g)),
                                       batch_size=8)


def train(lr: float = 0.05, accumulation: int = 2, clip: float = 1.0, raise_at: int = -1, **options):
    """An Accelerate loop as its docs write one, recording by hand at each sync the pre-clip global norm
    and the mean loss of the step's micro-batches."""
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = MLP()
    model, optimizer, data = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=lr), loader())
    reference, losses, micro = [], [], []
    with GradscopeAccelerate(accelerator, model, optimizer=optimizer, clip=clip, **options) as gradscope:
        for k, (x, y) in enumerate(data):
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                if k == raise_at:
                    raise RuntimeError("a corrupt batch")
                gradscope.observe(loss)
                micro.append(loss.item())
                if accelerator.sync_gradients:
                    losses.append(sum(micro) / len(micro))
                    micro = []
                    reference.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().norm().item())
                    accelerator.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad()
    return gradscope, reference, losses


def test_each_synced_step_is_observed_pre_clip():
    gradscope, reference, losses = train()
    report = gradscope.report
    assert report.statistics.model.steps == len(reference) == 5  # 10 micro-batches, 2 per optimizer step
    assert report.statistics.model.global_norm == pytest.approx(reference, rel=1e-5)
    assert report.statistics.model.loss == pytest.approx(losses, rel=1e-5)  # each step's micro-batches, averaged
    assert max(reference) > 1.0  # the clipping acted, and the figures are still the pre-clip ones
    assert report.statistics.model.metrics["clip_rate"] > 0  # what the loop's clip_grad_norm_ did


def test_the_report_is_written_and_fail_on_fails_on_every_process(tmp_path):
    out = tmp_path / "gradscope.json"
    with pytest.raises(GradientHealthError, match="gradient health check failed"):
        train(lr=40.0, accumulation=1, clip=1e9, output=out, fail_on="error")
    doc = Report.from_json(out)
    assert doc["gate"]["exit_code"] == 1 and not doc["partial"] and doc["steps"] == 10


def test_a_loop_that_raises_leaves_a_partial_report(tmp_path):
    out = tmp_path / "gradscope.json"
    with pytest.raises(RuntimeError, match="a corrupt batch"):
        train(raise_at=7, output=out)
    doc = Report.from_json(out)
    assert doc["partial"] and doc["steps"] == 3 and "a corrupt batch" in doc["stopped_reason"]
    assert doc["gate"]["exit_code"] == 2
