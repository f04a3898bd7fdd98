"""GradscopeCallback against a real lightning.Trainer on CPU: pre-clip numbers, accumulation, optimizers."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from gradscope.integrations.lightning import GradientHealthError, GradscopeCallback  # noqa: E402

from models import MLP  # noqa: E402


def loader(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class Regressor(pl.LightningModule):
    """Records the pre-clip global norm by hand in its own hook, which Lightning calls before clipping."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = MLP()
        self.lr = lr
        self.reference, self.weights = [], []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.reference.append(torch.cat([p.grad.reshape(-1) for p in self.parameters()]).double().norm().item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer(callback, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], **kwargs)


@pytest.mark.parametrize("clip", [None, 0.01])
def test_callback_reports_pre_clip_norms(clip, tmp_path):
    torch.manual_seed(0)
    module = Regressor()
    callback = GradscopeCallback(output=tmp_path / "report.json", update_every=1, histogram_sample=1)
    trainer(callback, max_steps=6, gradient_clip_val=clip).fit(module, loader())
    report = callback.reports[0]
    norms = report.statistics.model.global_norm
    assert len(norms) == 6
    assert norms == pytest.approx(module.reference, rel=1e-5)
    if clip:
        assert min(norms) > 10 * clip  # what was measured is far above what the clip let through
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 6
    assert report.statistics.model.loss[0] > 0  # losses reach the report from on_train_batch_end


def test_bf16_mixed_precision_measures_the_gradients_lightning_steps_with():
    torch.manual_seed(0)
    module = Regressor()
    callback = GradscopeCallback(update_every=1, histogram_sample=1)
    trainer(callback, max_steps=4, precision="bf16-mixed").fit(module, loader())
    assert callback.reports[0].statistics.model.global_norm == pytest.approx(module.reference, rel=1e-5)


def test_accumulation_is_observed_once_per_optimizer_step():
    torch.manual_seed(0)
    module = Regressor()
    callback = GradscopeCallback()
    trainer(callback, max_steps=4, accumulate_grad_batches=3).fit(module, loader())
    assert callback.reports[0].statistics.model.steps == 4 == len(module.reference)


def test_every_n_observes_every_nth_optimizer_step():
    """``GradscopeCallback(every=3)``: steps 0, 3, 6 and 9 of ten, each the norm Lightning's own hook saw."""
    torch.manual_seed(0)
    module = Regressor()
    callback = GradscopeCallback(every=3)
    trainer(callback, max_steps=10).fit(module, loader())
    model = callback.reports[0].statistics.model
    assert model.steps == 4 and model.series_steps.tolist() == [0, 3, 6, 9]
    assert model.global_norm == pytest.approx(module.reference[::3], rel=1e-5)


class TwoOptimizers(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.head = nn.Linear(8, 16), nn.Linear(16, 1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.head(torch.tanh(self.encoder(x))), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.encoder.parameters(), 0.01), torch.optim.Adam(self.head.parameters(), 1e-3)


def test_every_optimizer_gets_its_own_report(capsys):
    torch.manual_seed(0)
    callback = GradscopeCallback()
    trainer(callback, max_steps=8).fit(TwoOptimizers(), loader())
    layers = [[l.name for l in r.statistics.layers] for r in callback.reports]
    assert layers == [["encoder"], ["head"]]
    assert all(r.statistics.model.steps >= 4 for r in callback.reports)
    assert "TwoOptimizers (optimizer 1)" in capsys.readouterr().out


def test_fail_on_error_fails_the_fit():
    torch.manual_seed(0)
    module = Regressor(lr=5.0)  # SGD at lr 5 on this net diverges
    with pytest.raises(GradientHealthError, match="gradient health check failed"):
        trainer(GradscopeCallback(fail_on="error"), max_steps=20).fit(module, loader(n=320))


def test_fail_on_writes_the_verdict_it_raises_on(tmp_path):
    """The file and the error come from one verdict: the findings the JSON marks failing are those the
    error lists, and its exit code is the gate's."""
    torch.manual_seed(0)
    out = tmp_path / "health.json"
    callback = GradscopeCallback(fail_on="error", output=out)
    with pytest.raises(GradientHealthError) as raised:
        trainer(callback, max_steps=20).fit(Regressor(lr=5.0), loader(n=320))
    assert len(callback.reports) == 1 and not callback.reports[0].partial  # kept for the caller to read
    written = json.loads(out.read_text())
    gate = written["gate"]
    assert written["model"] == "Regressor" and written.get("stopped_reason") is None  # whole, not overwritten as partial
    assert gate["exit_code"] == 1 and gate["fail_on"] == "error" and not gate["passed"]
    assert gate["failing"] and all(f["rule_id"] in str(raised.value) for f in gate["failing"])


class SpikyAdam(Regressor):
    """Adam, with the gradients the optimizer gets recorded after every callback has acted."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def on_before_optimizer_step(self, optimizer):  # Lightning calls this after the callbacks' hook
        self.reference.append(float(torch.cat([p.grad.reshape(-1) for p in self.parameters()]).norm()))
        self.weights.append([p.detach().clone() for p in self.parameters()])


def spiky_loader(n: int = 320, spike: int = 30):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    y[spike * 8:(spike + 1) * 8] *= 100.0  # batch 30's targets
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def test_the_clipper_callback_skips_the_outlier_batch_and_checkpoints_its_state(tmp_path):
    from gradscope import Clipper, Skip
    from gradscope.integrations.lightning import ClipperCallback
    torch.manual_seed(0)
    module = SpikyAdam()
    callback = ClipperCallback(Clipper("none", None, skip=Skip()))
    fit = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[callback], max_steps=40, default_root_dir=tmp_path)
    fit.fit(module, spiky_loader())
    counts = callback.clipper.counts()
    assert counts["steps"] == 40 and [e["step"] for e in counts["events"]] == [30] and counts["skipped"] == 1
    assert module.reference[30] == 0.0 and all(n > 0 for k, n in enumerate(module.reference) if k != 30)
    # the skipped step was skipped by Adam itself: the weights before step 31 are those before step 30
    assert counts["skip_kind"] == "restore"
    assert all(torch.equal(a, b) for a, b in zip(module.weights[30], module.weights[31]))
    assert not all(torch.equal(a, b) for a, b in zip(module.weights[29], module.weights[30]))
    path = tmp_path / "last.ckpt"
    fit.save_checkpoint(path)
    saved = next(v for k, v in torch.load(path, weights_only=False)["callbacks"].items() if "ClipperCallback" in k)
    restored = ClipperCallback(Clipper("none", None, skip=Skip()))
    restored.load_state_dict(saved)
    assert int(restored.clipper.state_dict()["skipped"]) == 1 and int(restored.clipper.state_dict()["step"]) == 40


def test_the_clipper_callback_refuses_a_second_clip(tmp_path):
    from gradscope import Clipper, GradscopeError
    from gradscope.integrations.lightning import ClipperCallback
    with pytest.raises(GradscopeError, match="gradient_clip_val"):
        trainer(ClipperCallback(Clipper("norm", 1.0)), max_steps=2, gradient_clip_val=0.5).fit(Regressor(), loader())


class DiesAtStep5(Regressor):
    def training_step(self, batch, batch_idx):
        if batch_idx == 5:
            raise RuntimeError("a corrupt shard")
        return super().training_step(batch, batch_idx)


class SignalledAtStep5(Regressor):
    def __init__(self, signum) -> None:
        super().__init__()
        self.signum = signum

    def training_step(self, batch, batch_idx):
        if batch_idx == 5:
            os.kill(os.getpid(), self.signum)  # a scheduler's preemption, or Ctrl-C
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("signum, words, code", [(signal.SIGTERM, "terminated by SIGTERM, after 6", 143),
                                                 (signal.SIGINT, "interrupted by Ctrl-C, after 5", 130)])
def test_a_fit_stopped_by_a_signal_leaves_a_partial_report(tmp_path, signum, words, code):
    # SIGTERM: Lightning's own handler notes it and its loop raises SIGTERMException after the step ends
    # (6 steps); SIGINT: KeyboardInterrupt inside step 5, then Lightning exits 1 (and ignores SIGINT).
    torch.manual_seed(0)
    out = tmp_path / "report.json"
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            trainer(GradscopeCallback(output=out), max_steps=20).fit(SignalledAtStep5(signum), loader())
    finally:
        signal.signal(signal.SIGINT, previous)
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["stopped_reason"].startswith(words + " observed steps")
    assert doc["gate"]["exit_code"] == code


def test_a_fit_that_raises_leaves_a_partial_report(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "report.json"
    callback = GradscopeCallback(output=out)
    with pytest.raises(RuntimeError, match="a corrupt shard"):
        trainer(callback, max_steps=20).fit(DiesAtStep5(), loader())
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["steps"] == 5
    assert doc["stopped_reason"] == "the training loop raised RuntimeError: a corrupt shard, after 5 observed steps"
    assert doc["gate"]["exit_code"] == 2


class Annealed(Regressor):
    """Its loss is scaled down 10% a step: the pre-clip norms fall about 500x over 60 steps."""

    def training_step(self, batch, batch_idx):
        return 0.9 ** self.global_step * super().training_step(batch, batch_idx)


@pytest.mark.parametrize("clip_val, algorithm, module, rule", [
    (1e-3, "norm", Regressor, "clipping-every-step"),
    (1e6, "norm", Regressor, "clipping-never-acts"),
    (0.5, "norm", Annealed, "clipping-stale"),
    (1e-3, "value", Regressor, "clipping-every-step"),
])
def test_the_fits_own_clipping_is_reported(tmp_path, clip_val, algorithm, module, rule):
    torch.manual_seed(0)
    callback = GradscopeCallback(output=tmp_path / "report.json")
    model = module()
    trainer(callback, max_steps=60, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm).fit(model, loader())
    doc = json.loads((tmp_path / "report.json").read_text())
    clip = doc["clipping"]
    assert clip["method"] == algorithm and clip["threshold"] == clip_val
    assert clip["source"] == "Trainer's gradient_clip_val" and clip["steps"] == 60
    assert clip["rate"] == pytest.approx(0.0 if rule == "clipping-never-acts" else clip["clipped"] / 60, rel=1e-5)
    if algorithm == "norm":  # Lightning's own record of the pre-clip norm, clipped as clip_grad_norm_ does
        expected = [n * min(1.0, clip_val / (n + 1e-6)) for n in model.reference]
        assert clip["post_clip_norm"] == pytest.approx(expected, rel=1e-5)
    assert rule in [f["rule_id"] for f in doc["findings"]]
