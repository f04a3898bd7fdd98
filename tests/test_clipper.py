"""Clipper against torch's own clipping functions and a naive unit-wise AGC."""
from __future__ import annotations

import pytest
import torch

import gradscope
from gradscope.run.clipper import Clipper
from gradscope.advise.guards import Skip
from gradscope.errors import GradscopeError

from models import MLP, exploding_rnn, mse, regression_batches


def model_with_grads(scale: float = 100.0):
    torch.manual_seed(0)
    model = MLP()
    (scale * mse(model, regression_batches()())).backward()
    return model


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("method, reference", [
    ("norm", lambda m, t: torch.nn.utils.clip_grad_norm_(m.parameters(), t)),
    ("value", lambda m, t: torch.nn.utils.clip_grad_value_(m.parameters(), t)),
])
def test_norm_and_value_match_torch(method, reference):
    ours, theirs = model_with_grads(), model_with_grads()
    Clipper(method, 0.5)(ours)
    reference(theirs, 0.5)
    for a, b in zip(grads(ours), grads(theirs)):
        assert torch.equal(a, b)
    assert not torch.equal(grads(ours)[0], grads(model_with_grads())[0])  # it did clip


def naive_agc(model, factor, eps, excluded):
    for name, module in model.named_modules():
        if name in excluded:
            continue
        for p in module.parameters(recurse=False):
            w, g = p.detach(), p.grad
            rows = [(w, g)] if w.ndim <= 1 else [(w[i], g[i]) for i in range(w.shape[0])]
            for w_row, g_row in rows:
                limit = max(w_row.norm().item(), eps) * factor
                norm = g_row.norm().item()
                if norm > limit:
                    g_row.mul_(limit / max(norm, 1e-6))


def test_agc_is_unitwise_and_leaves_the_final_linear_layer():
    ours, theirs = model_with_grads(), model_with_grads()
    untouched = ours.out.weight.grad.clone()
    Clipper("agc", 0.01)(ours)
    naive_agc(theirs, 0.01, 1e-3, {"out"})
    for a, b in zip(grads(ours), grads(theirs)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    assert torch.equal(ours.out.weight.grad, untouched)
    everything = model_with_grads()
    Clipper("agc", 0.01, exclude=())(everything)
    assert not torch.equal(everything.out.weight.grad, untouched)


def final_loss(clipper=None, steps: int = 30) -> float:
    experiment = exploding_rnn()
    batch = experiment.batches
    for _ in range(steps):
        experiment.optimizer.zero_grad()
        loss = experiment.model(*batch())
        loss.backward()
        if clipper is not None:
            clipper(experiment.model)
        experiment.optimizer.step()
    return loss.item()


def test_from_report_applies_the_recommendation():
    report = gradscope.diagnose(exploding_rnn(), steps=30, seed=0)
    clipper = Clipper.from_report(report)
    assert (clipper.method, clipper.threshold) == (report.recommendation.method, report.recommendation.threshold)
    torch.manual_seed(0)
    clipped = final_loss(clipper)
    torch.manual_seed(0)
    unclipped = final_loss()
    assert clipped < 1e-6 * unclipped  # the unclipped run's loss has blown up by many orders of magnitude


def test_bad_arguments_are_clear_errors():
    with pytest.raises(GradscopeError, match="unknown clipping method"):
        Clipper("l1", 1.0)
    with pytest.raises(GradscopeError, match="needs a positive threshold"):
        Clipper("norm", None)
    Clipper("none", None)(model_with_grads())  # a no-op


def test_a_none_recommendation_arms_its_safety_net():
    from models import healthy_mlp
    report = gradscope.diagnose(healthy_mlp(), steps=10, seed=0)
    assert report.recommendation.method == "none"
    net = report.recommendation.evidence.safety_net
    clipper = Clipper.from_report(report)
    assert clipper.safety_net == net and repr(clipper) == f"Clipper('none', safety_net={net!r}, skip={Skip()!r})"
    assert clipper.skip == report.recommendation.guard.skip  # Adam: the skip guard is armed with the net
    model = model_with_grads(scale=1e6)  # a blow-up far above anything profiled
    grads = [p.grad for p in model.parameters()]
    assert float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) > net
    clipper(model)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert float(norm) == pytest.approx(net, rel=1e-4)
    model = model_with_grads(scale=1e6)
    before = [p.grad.clone() for p in model.parameters()]
    Clipper.from_report(report, safety_net=False)(model)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    with pytest.raises(GradscopeError, match="safety net must be a positive norm"):
        Clipper("none", None, safety_net=0.0)


def test_from_json_gives_the_same_clipper_as_from_report(tmp_path):
    report = gradscope.diagnose(exploding_rnn(), steps=30, seed=0)
    path = tmp_path / "report.json"
    path.write_text(report.to_json())
    for source in (path, str(path), __import__("json").loads(report.to_json())):
        clipper = Clipper.from_json(source)
        assert (clipper.method, clipper.threshold) == (report.recommendation.method, report.recommendation.threshold)
    (tmp_path / "other.json").write_text('{"kind": "something else"}')
    with pytest.raises(GradscopeError, match="not a gradscope JSON report"):
        Clipper.from_json(tmp_path / "other.json")
    with pytest.raises(GradscopeError, match="cannot read a gradscope report"):
        Clipper.from_json(tmp_path / "absent.json")


# -- sparse gradients (nn.Embedding(..., sparse=True)), for which torch's clip_grad_norm_ raises --------------
class Recommender(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.users = torch.nn.Embedding(50, 8, sparse=True)
        self.items = torch.nn.Embedding(80, 8, sparse=True)
        self.bias = torch.nn.Linear(8, 1)  # a dense parameter beside the sparse ones

    def forward(self, users, items):
        return (self.users(users) * self.items(items)).sum(-1) + self.bias(self.items(items)).squeeze(-1)


def recommender_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return lambda: (torch.randint(0, 50, (32,), generator=g), torch.randint(0, 80, (32,), generator=g),
                    10 * torch.randn(32, generator=g))


def recommender_loss(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0], batch[1]), batch[2])


def sparse_grads():
    torch.manual_seed(0)
    model = Recommender()
    recommender_loss(model, recommender_batches()()).backward()
    assert model.users.weight.grad.is_sparse and not model.bias.weight.grad.is_sparse
    return model


def test_norm_clipping_with_sparse_gradients_matches_a_dense_reference():
    model = sparse_grads()
    dense = [p.grad.to_dense().clone() for p in model.parameters()]
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in dense))
    Clipper("norm", 0.5)(model)
    for p, g in zip(model.parameters(), dense):
        assert p.grad.is_sparse == (p is not model.bias.weight and p is not model.bias.bias)
        torch.testing.assert_close(p.grad.to_dense(), g * float(0.5 / (total + 1e-6)), rtol=1e-6, atol=1e-7)
    again = sparse_grads()
    assert float(gradscope.run.clipper.clip_norm_(again.parameters(), 1e9)) == pytest.approx(float(total), rel=1e-6)


def test_value_clipping_caps_sparse_gradients_too():
    model = sparse_grads()
    dense = [p.grad.to_dense().clone() for p in model.parameters()]
    Clipper("value", 0.05)(model)
    for p, g in zip(model.parameters(), dense):
        torch.testing.assert_close(p.grad.to_dense(), g.clamp(-0.05, 0.05))


def test_dense_gradients_alone_are_clipped_by_torch_itself():
    a, b = model_with_grads(), model_with_grads()
    norm = gradscope.run.clipper.clip_norm_(a.parameters(), 0.1)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1))
    assert all(torch.equal(x, y) for x, y in zip(grads(a), grads(b)))


def test_diagnose_runs_its_trials_on_a_model_with_sparse_gradients():
    """SparseAdam at lr 1 on a recommender blows up; the trials (which clip at each candidate) used to
    stop with torch's NotImplementedError for the SparseCPU backend."""
    torch.manual_seed(0)
    model = Recommender()
    params = [model.users.weight, model.items.weight]
    optimizer = torch.optim.SparseAdam(params, lr=1.0)
    for p in model.bias.parameters():  # SparseAdam takes sparse gradients alone: the dense head stays frozen
        p.requires_grad_(False)
    experiment = gradscope.Experiment(model, optimizer, recommender_batches(), loss_fn=recommender_loss)
    report = gradscope.diagnose(experiment, steps=30, seed=0)
    trials = report.recommendation.evidence.trials
    assert not report.healthy and trials is not None and len(trials.trials) >= 2
    assert all(t.losses for t in trials.trials)  # every trial trained (and clipped) its sparse gradients


@pytest.mark.parametrize("method, threshold", [("norm", 0.5), ("value", 0.05), ("agc", 0.01), ("adaptive", 2.5)])
@pytest.mark.parametrize("guarded", [False, True])
def test_every_parameter_kind_is_clipped(method, threshold, guarded):
    """Complex, zero-element and frozen parameters beside plain ones, against a naive reference: the
    norm counts a complex element by its modulus, and value clipping caps the modulus, keeping the phase."""
    from models import every_kind
    experiment = every_kind()
    model, batch = experiment.model, experiment.batches[0]
    clipper = Clipper(method, threshold, skip=gradscope.Skip() if guarded else None)
    mse(model, batch).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    clipper(model)
    assert model.frozen.weight.grad is None
    total = torch.sqrt(sum(g.abs().double().square().sum() for g in grads.values()))
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = grads[name]
        if method == "norm" or (method == "adaptive" and not guarded):
            expected = g * min(1.0, threshold / (float(total) + 1e-6)) if method == "norm" else g  # adaptive: warm-up
        elif method == "value":
            expected = g * (threshold / g.abs().clamp(min=1e-30)).clamp(max=1.0) if g.is_complex() \
                else g.clamp(-threshold, threshold)
        else:
            expected = None
        if expected is not None:
            assert torch.allclose(p.grad, expected, rtol=1e-5, atol=1e-8), name
    if method == "value":
        assert model.phase.grad.abs().max() <= threshold * (1 + 1e-6)
        assert torch.allclose(torch.angle(model.phase.grad), torch.angle(grads["phase"]), atol=1e-5)
