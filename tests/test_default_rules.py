"""Every default rule: one real training run that trips it, and one healthy run that does not."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import gradscope
from gradscope import load_rules

from test_amp import amp_overflow
from models import MLP, TinyLSTM, exploding_rnn, healthy_lstm, healthy_mlp, mse, regression_batches, sequence_batches

STEPS = 30


def _run(experiment, steps: int = STEPS) -> gradscope.Report:
    """diagnose() an Experiment; a fixture that trains its own loop (AMP) hands back its Report."""
    if isinstance(experiment, gradscope.Report):
        return experiment
    return gradscope.diagnose(experiment, steps=steps, seed=0, trials=0)  # detection only: no trials


def nonfinite_gradients() -> gradscope.Experiment:
    """sqrt at zero: the loss is finite (0) but its gradient is inf."""
    torch.manual_seed(0)
    model = MLP()

    def loss_fn(m, batch):
        out = m(batch[0])
        return nn.functional.mse_loss(out, batch[1]) + torch.sqrt((out - out.detach()).abs()).sum()
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=1e-3), regression_batches(),
                                loss_fn=loss_fn)


def nonfinite_loss() -> gradscope.Experiment:
    torch.manual_seed(0)
    model = MLP()
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=1e-3), regression_batches(),
                                loss_fn=lambda m, b: mse(m, b) * float("inf"))


def rising_norm() -> gradscope.Experiment:
    """The loss is scaled up 13% a step: the gradient norm trends upward about 40x over 30 steps."""
    torch.manual_seed(0)
    model = MLP()
    counter = itertools.count()
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=1e-4), regression_batches(),
                                loss_fn=lambda m, b: 1.13 ** next(counter) * mse(m, b))


class TinyRNN(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def growing_rnn() -> gradscope.Experiment:
    """A tanh RNN whose loss is scaled up 25% a step, under an SGD too slow to move it: its gradient grows x1.25
    a step, by construction, on any float kernel (the exploding RNN's own growth is chaotic past the blow-up)."""
    torch.manual_seed(0)
    model = TinyRNN()
    counter = itertools.count()
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=1e-6), sequence_batches(),
                                loss_fn=lambda m, b: 1.25 ** next(counter) * nn.functional.mse_loss(m(b[0]), b[1]))


def corrupted_at_20(corrupt, betas=(0.9, 0.999)) -> gradscope.Experiment:
    """An MLP under Adam on clean regression batches, except step 20's, which ``corrupt(x, y)`` returns."""
    torch.manual_seed(0)
    model = MLP()
    plain = regression_batches()
    counter = itertools.count()

    def batch():
        x, y = plain()
        return corrupt(x, y) if next(counter) == 20 else (x, y)
    return gradscope.Experiment(model, torch.optim.Adam(model.parameters(), lr=1e-3, betas=betas), batch, loss_fn=mse)


def spiky_batches(betas=(0.9, 0.999)) -> gradscope.Experiment:
    """Step 20's batch carries targets 300x larger than usual."""
    return corrupted_at_20(lambda x, y: (x, y * 300), betas)


def corrupted_sample() -> gradscope.Experiment:
    """One sample of step 20's batch has a target 1000x larger than usual; the other 15 are as ever."""
    def one_target(x, y):
        y = y.clone()
        y[5] *= 1000
        return x, y
    return corrupted_at_20(one_target)


class Normed(nn.Module):
    """An embedding, a LayerNorm and a head: the parameters weight decay should leave alone, and one it should not."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm, self.head = nn.Embedding(50, 32), nn.LayerNorm(32), nn.Linear(32, 50)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)).mean(1))


def decayed(exempt: bool) -> gradscope.Experiment:
    """AdamW with weight decay 0.1 on every parameter, or (``exempt``) on the head's weight alone."""
    torch.manual_seed(0)
    model = Normed()
    if exempt:
        groups = [{"params": [model.head.weight], "weight_decay": 0.1},
                  {"params": [p for n, p in model.named_parameters() if n != "head.weight"], "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": 0.1}]
    g = torch.Generator().manual_seed(0)

    def batch():
        x = torch.randint(0, 50, (16, 8), generator=g)
        return x, x[:, 0]
    return gradscope.Experiment(model, torch.optim.AdamW(groups, lr=1e-3), batch,
                                loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))


def optimizer_over(part) -> gradscope.Report:
    """A plain loop whose Monitor is given an optimizer over ``part(model)``: the model's parameters it holds."""
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.Adam(part(model), lr=1e-3)
    batches = regression_batches()
    monitor = gradscope.Monitor(model, optimizer=optimizer)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = mse(model, batches())
        loss.backward()
        monitor.observe(loss)
        optimizer.step()
    return monitor.report()


class Scaled(nn.Module):
    """An MLP whose first layer is scaled by ``scale`` in the forward pass (0 cuts it off)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.net = MLP()
        self.scale = scale

    def forward(self, x):
        first = self.net.hidden[0]
        h = torch.tanh(first(x) * self.scale + first.bias.detach() * (1 - self.scale))
        for layer in self.net.hidden[1:]:
            h = torch.tanh(layer(h))
        return self.net.out(h)


def scaled_first_layer(scale: float) -> gradscope.Experiment:
    torch.manual_seed(0)
    model = Scaled(scale)
    return gradscope.Experiment(model, torch.optim.Adam(model.parameters(), lr=1e-3), regression_batches(),
                                loss_fn=mse)


def dominating_layer() -> gradscope.Experiment:
    """A 2048-wide input into a 32-wide net: the first layer holds most parameters and most of the norm."""
    torch.manual_seed(0)
    model = MLP(d_in=2048)
    return gradscope.Experiment(model, torch.optim.Adam(model.parameters(), lr=1e-4),
                                regression_batches(d_in=2048), loss_fn=mse)


def heavy_tailed() -> gradscope.Experiment:
    """Cauchy-distributed inputs make the first layer's weight gradient heavy-tailed."""
    torch.manual_seed(0)
    model = MLP(width=128)
    g = torch.Generator().manual_seed(0)

    def batch():
        x = torch.tan(3.14159 * (torch.rand(64, 8, generator=g) - 0.5))  # standard Cauchy
        return x.clamp(-1e4, 1e4), torch.randn(64, 1, generator=g)
    return gradscope.Experiment(model, torch.optim.Adam(model.parameters(), lr=1e-4), batch, loss_fn=mse)


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()
        self.spare = nn.Linear(8, 8)  # never called in forward

    def forward(self, x):
        return self.net(x)


def unused_layer() -> gradscope.Experiment:
    torch.manual_seed(0)
    model = WithUnused()
    return gradscope.Experiment(model, torch.optim.Adam(model.parameters(), lr=1e-3), regression_batches(),
                                loss_fn=mse)


def huge_lr() -> gradscope.Experiment:
    """SGD at lr 1: every step moves the weights by a large fraction of their norm."""
    torch.manual_seed(0)
    model = MLP()
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=1.0), regression_batches(),
                                loss_fn=mse)


def recurrent_high() -> gradscope.Experiment:
    """An LSTM on inputs scaled by 100, trained with a tiny step: gradients far above its weights."""
    torch.manual_seed(0)
    model = TinyLSTM()
    plain = sequence_batches()

    def batch():
        x, y = plain()
        return x, y * 1e3
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=1e-6), batch, loss_fn=mse)


def healthy_sgd() -> gradscope.Experiment:
    torch.manual_seed(0)
    model = MLP()
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9),
                                regression_batches(), loss_fn=mse)


def overshooting_sgd() -> gradscope.Experiment:
    """Full-batch least squares at an SGD learning rate 0.95x the edge of stability (2 over the sharpest
    curvature): the loss falls, while each step overshoots along the sharpest direction and the next comes
    back, so successive gradients point nearly opposite (cosine about -1)."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 1)
    model = nn.Linear(16, 1, bias=False)
    sharpest = float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max())  # the Hessian of the mean squared error
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=1.9 / sharpest), [(x, y)],
                                loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))


def watched_run(clip: float, steps: int = 60, scale=lambda step: 1.0, spike=None) -> gradscope.Report:
    """A plain loop that clips by norm at ``clip`` and tells its Monitor so; its loss scaled by
    ``scale(step)``, and step ``spike``'s targets 300x their size. The norms run 2.3 to 12 (p10 to max)."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    batches = regression_batches()
    monitor = gradscope.Monitor(model, clip=clip)
    for step in range(steps):
        opt.zero_grad()
        x, y = batches()
        (scale(step) * mse(model, (x, y * (300 if step == spike else 1)))).backward()
        monitor.observe()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return monitor.report()


TRIPS = {
    "nonfinite-gradients": nonfinite_gradients,
    "nonfinite-loss": nonfinite_loss,
    "loss-diverging": exploding_rnn,
    "global-norm-growing": exploding_rnn,
    "global-norm-blowup": exploding_rnn,
    "global-norm-rising": rising_norm,
    "gradient-direction-flips": overshooting_sgd,
    "gradient-spike": spiky_batches,
    "layer-dominates": dominating_layer,
    "heavy-tailed-gradients": heavy_tailed,
    "vanishing-layer": lambda: scaled_first_layer(1e-6),
    "dead-layer": lambda: scaled_first_layer(0.0),
    "unused-parameters": unused_layer,
    "large-update-ratio": huge_lr,
    "recurrent-norm-growing": growing_rnn,
    "recurrent-norm-high": recurrent_high,
    "amp-skipped-steps": lambda: amp_overflow(backoff=0.5),
    "amp-skipping-often": lambda: amp_overflow(backoff=0.95),
    "adaptive-optimizer-outliers": healthy_mlp,  # Adam: the guard's rule is about the optimizer, not a symptom
    "clipping-every-step": lambda: watched_run(0.01),
    "clipping-never-acts": lambda: watched_run(1e6),
    "clipping-stale": lambda: watched_run(1.0, scale=lambda step: 0.93 ** step),  # the norms fall 77x
    "clipping-cut-spikes": lambda: watched_run(17.0, spike=40),
    # read from diagnose's trials, so its fixtures run them: the RNN's unclipped trial diverges
    "unclipped-unstable-in-trials": lambda: gradscope.diagnose(exploding_rnn(), steps=STEPS, seed=0),
    "spike-from-few-samples": corrupted_sample,
    "spike-from-one-batch": spiky_batches,
    "optimizer-misses-parameters": lambda: optimizer_over(lambda m: MLP().parameters()),  # another model's
    "optimizer-misses-some-parameters": lambda: optimizer_over(lambda m: [p for n, p in m.named_parameters()
                                                                          if not n.endswith("bias")]),
    "weight-decay-on-norms": lambda: decayed(exempt=False),
    "adam-epsilon-dominates": lambda: healthy_mlp(loss_scale=1e-17),  # gradients ~1e-9 of Adam's eps, 1e-8
    "adam-beta2-under-spikes": spiky_batches,
}
HEALTHY = {rule_id: (healthy_lstm if rule_id.startswith("recurrent") else healthy_mlp) for rule_id in TRIPS}
HEALTHY["adaptive-optimizer-outliers"] = healthy_sgd
# the spikes call for trials, and there unclipped training stays stable
HEALTHY["unclipped-unstable-in-trials"] = lambda: gradscope.diagnose(spiky_batches(), steps=STEPS, seed=0)
HEALTHY["spike-from-few-samples"] = spiky_batches  # a spike all 16 samples carry: the batch, not a sample
HEALTHY["weight-decay-on-norms"] = lambda: decayed(exempt=True)
HEALTHY["adam-beta2-under-spikes"] = lambda: spiky_batches(betas=(0.9, 0.95))  # the same spike under beta2 0.95
for rule_id in TRIPS:  # a threshold near the norms' 80th percentile: it acts on some steps, not all
    if rule_id.startswith("clipping-"):
        HEALTHY[rule_id] = lambda: watched_run(6.5)


def test_every_default_rule_has_fixtures():
    assert {r.id for r in load_rules().rules} == set(TRIPS)


@pytest.mark.parametrize("rule_id", sorted(TRIPS))
def test_rule_trips(rule_id):
    report = _run(TRIPS[rule_id]())
    fired = [f for f in report.findings if f.rule_id == rule_id]
    assert fired, f"{rule_id} did not fire; findings: {[f.rule_id for f in report.findings]}"
    assert all(f.message and "{" not in f.message for f in fired)


@pytest.mark.parametrize("rule_id", sorted(TRIPS))
def test_rule_quiet_on_healthy_model(rule_id):
    report = _run(HEALTHY[rule_id]())
    assert not [f for f in report.findings if f.rule_id == rule_id]
