"""GradscopeTrainerCallback with a real Trainer and a tiny GPT-2 built from its config (no downloads)."""
from __future__ import annotations

import os
import signal

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gradscope  # noqa: E402
from gradscope import ProfileOptions  # noqa: E402
from gradscope.integrations.transformers import GradscopeTrainerCallback  # noqa: E402


def tiny_gpt2(initializer_range: float = 0.02):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32,
                                     initializer_range=initializer_range)
    return transformers.GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 128, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(tmp_path, max_grad_norm: float, accumulation: int = 1, steps: int = 5, model=None, every: int = 1,
          log=None):
    callback = GradscopeTrainerCallback(output=tmp_path / "report.txt", update_every=1, histogram_sample=1,
                                        every=every, log=log)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        max_grad_norm=max_grad_norm, gradient_accumulation_steps=accumulation, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model or tiny_gpt2(), args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "grad_norm" in entry]
    return callback.report, [float(e["grad_norm"]) for e in history], [float(e["loss"]) for e in history]


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.01])
def test_trainer_callback_measures_pre_clip(tmp_path, max_grad_norm):
    report, logged, losses = train(tmp_path, max_grad_norm)
    norms = report.statistics.model.global_norm
    # the Trainer logs the norm clip_grad_norm_ returns: the pre-clip norm
    assert len(norms) == len(logged) == 5
    assert norms == pytest.approx(logged, rel=1e-5)
    if max_grad_norm:
        assert min(norms) > 10 * max_grad_norm  # measured far above what clipping let through
    assert report.statistics.model.loss == pytest.approx(losses, abs=2e-3)  # from the model's output.loss
    assert (tmp_path / "report.txt").read_text().startswith("gradscope GPT2LMHeadModel")


def test_trainer_accumulation_observed_once_per_optimizer_step(tmp_path):
    report, logged, _ = train(tmp_path, 1.0, accumulation=4, steps=3)
    assert report.statistics.model.steps == 3
    assert report.statistics.model.global_norm == pytest.approx(logged, rel=1e-5)


def test_trainer_every_n_observes_every_nth_optimizer_step(tmp_path):
    report, logged, losses = train(tmp_path, 1.0, steps=7, every=3)
    model = report.statistics.model
    assert model.series_steps.tolist() == [0, 3, 6]
    assert model.global_norm == pytest.approx(logged[::3], rel=1e-5)
    assert model.loss == pytest.approx(losses[::3], abs=2e-3)


def test_diagnose_accepts_a_hugging_face_model_with_dict_batches():
    model = tiny_gpt2()
    data = Tokens(8)
    batches = [{"input_ids": data.ids[i:i + 4], "labels": data.ids[i:i + 4]} for i in range(0, 8, 4)]
    experiment = gradscope.Experiment(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batches)
    report = gradscope.diagnose(experiment, steps=4)
    assert report.statistics.model.steps == 4
    names = {layer.name for layer in report.statistics.layers}
    assert "transformer.h.0.attn.c_attn" in names and "transformer.wte" in names


def test_diagnose_steps_a_hugging_face_warm_up_schedule_and_puts_it_back():
    """transformers' linear warm-up (a LambdaLR from 0) as Experiment.scheduler: the profile trains at the
    warm-up's rates, and the schedule is back at its start afterwards."""
    model = tiny_gpt2()
    data = Tokens(8)
    batches = [{"input_ids": data.ids[i:i + 4], "labels": data.ids[i:i + 4]} for i in range(0, 8, 4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=100)
    experiment = gradscope.Experiment(model, optimizer, batches, scheduler=schedule)
    report = gradscope.diagnose(experiment, steps=6, profile=ProfileOptions(extend=False))
    assert report.statistics.model.steps == 6
    assert schedule.last_epoch == 0 and optimizer.param_groups[0]["lr"] == 0.0  # the warm-up's start
    gradscope.diagnose(experiment, steps=6, profile=ProfileOptions(extend=False, restore=False))
    assert schedule.last_epoch == 6 and optimizer.param_groups[0]["lr"] == pytest.approx(6e-4)


def test_the_clipper_callback_clips_and_guards_inside_the_trainer(tmp_path):
    from gradscope.integrations.transformers import ClipperTrainerCallback
    clipper = gradscope.Clipper("norm", 0.01, skip=gradscope.Skip())
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-3,
        max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(),
                                   callbacks=[ClipperTrainerCallback(clipper)])
    trainer.train()
    logged = [float(e["grad_norm"]) for e in trainer.state.log_history if "grad_norm" in e]  # pre-clip norms
    counts = clipper.counts()
    assert counts["steps"] == 5 and counts["clipped"] == 5 and counts["skipped"] == 0
    expected = torch.tensor([0.01 / (n + 1e-6) for n in logged]).log().mean().exp().item()
    assert counts["mean_clip_scale"] == pytest.approx(expected, rel=1e-4)
    assert "gradscope_clipper" in trainer.optimizer.state_dict()  # saved with each checkpoint's optimizer.pt


def test_the_clipper_callback_refuses_to_clip_after_the_trainer_has(tmp_path):
    from gradscope.integrations.transformers import ClipperTrainerCallback
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, max_grad_norm=1.0,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(),
                                   callbacks=[ClipperTrainerCallback(gradscope.Clipper("norm", 0.5))])
    with pytest.raises(gradscope.GradscopeError, match="max_grad_norm=0"):
        trainer.train()


def eight_steps(tmp_path, callback):
    """A Trainer of 8 steps of the tiny GPT-2 with ``callback``, its own clipping left at the default."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    return transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(), callbacks=[callback])


def test_a_train_that_raises_inside_recording_leaves_a_partial_report(tmp_path):
    import json

    class Dies(GradscopeTrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("out of memory (simulated)")
    out = tmp_path / "report.json"
    callback = Dies(output=out)
    trainer = eight_steps(tmp_path, callback)
    with pytest.raises(RuntimeError, match="out of memory"):
        with callback.recording():
            trainer.train()
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["steps"] == 3
    assert doc["stopped_reason"] == ("the training loop raised RuntimeError: out of memory (simulated), "
                                     "after 3 observed steps")


@pytest.mark.parametrize("signum, words, exc", [(signal.SIGTERM, "terminated by SIGTERM", SystemExit),
                                                (signal.SIGINT, "interrupted by Ctrl-C", KeyboardInterrupt)])
def test_a_train_stopped_by_a_signal_inside_recording_leaves_a_partial_report(tmp_path, signum, words, exc):
    import json

    class Signalled(GradscopeTrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signum)  # a scheduler's preemption, or Ctrl-C
    out = tmp_path / "report.json"
    callback = Signalled(output=out)
    trainer = eight_steps(tmp_path, callback)
    with pytest.raises(exc) as raised:
        with callback.recording():
            trainer.train()
    if signum == signal.SIGTERM:
        assert raised.value.code == 143  # the process ends as the signal would, once the report is written
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["stopped_reason"] == f"{words}, after 3 observed steps"
    assert doc["gate"]["exit_code"] == (143 if signum == signal.SIGTERM else 130)


def test_the_trainers_own_clipping_is_reported(tmp_path):
    # initializer_range 0.5: pre-clip norms of 10 to 24 under the Trainer's default max_grad_norm=1.0
    report, logged, _ = train(tmp_path, 1.0, steps=24, model=tiny_gpt2(initializer_range=0.5))
    m = report.statistics.model
    assert min(logged) > 5 and m.clip.spec.source == "Trainer's max_grad_norm" and m.clip.spec.threshold == 1.0
    assert m.metrics["clip_rate"] == 1.0 and m.metrics["clip_steps"] == 24
    assert m.post_clip_norm.tolist() == pytest.approx([n / (n + 1e-6) for n in logged], rel=1e-5)
    fired = [f for f in report.findings if f.rule_id == "clipping-every-step"]
    assert fired and "acted on 100% of 24 steps in a row" in fired[0].message


def test_a_threshold_the_trainer_never_reaches_is_reported(tmp_path):
    report, logged, _ = train(tmp_path, 100.0, steps=24)
    assert max(logged) < 100 and report.statistics.model.metrics["clip_rate"] == 0.0
    assert [f.rule_id for f in report.findings if f.rule_id.startswith("clipping-")] == ["clipping-never-acts"]
