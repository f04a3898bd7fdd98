"""`gradscope watch`: real training scripts with no gradscope in them, run unchanged in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import HANG_S

SCRIPT = '''
"""A plain training script: an MLP whose learning rate sends it to NaN; it prints, and takes arguments."""
import argparse
import os
import signal

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--lr", type=float, default=0.5)
parser.add_argument("--clip", type=float, default=None)
parser.add_argument("--raise-at", type=int, default=None)
parser.add_argument("--term-at", type=int, default=None)
args = parser.parse_args()
torch.manual_seed(0)
model = nn.Sequential()
model.add_module("encoder", nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh()))
model.add_module("head", nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
w = torch.randn(16, 1)
for step in range(args.steps):
    if step == args.raise_at:
        raise RuntimeError(f"the data loader failed at step {step}")
    if step == args.term_at:
        os.kill(os.getpid(), signal.SIGTERM)
    x = torch.randn(32, 16)
    y = (x @ w) * 10
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if args.clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    optimizer.step()
    if step % 10 == 0:
        print(f"step {step} loss {loss.item():.4g}")
print("done", flush=True)
'''


def watch(tmp_path: Path, *args: str, script: str = SCRIPT, name: str = "train.py", env=None):
    (tmp_path / name).write_text(script, encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "gradscope", "watch", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=HANG_S, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def plain(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=HANG_S)


def test_a_plain_script_is_watched_unchanged_and_its_explosion_fails_the_gate(tmp_path):
    proc = watch(tmp_path, "--format", "json", "--output", "r.json", "train.py", "--steps", "40")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == plain(tmp_path, "--steps", "40").stdout  # its output as it was, its arguments passed
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert doc["steps"] == 40  # --steps 40 reached the script
    assert [layer["name"] for layer in doc["layers"]] == ["encoder.0", "encoder.2", "head"]
    assert "nonfinite-gradients" in doc["unhealthy_because"] and doc["global"]["loss"][0] > 0
    assert "after any clipping the script does itself" in doc["measurement"]
    assert "estimate from the watched run" in proc.stderr


def test_a_healthy_script_exits_0_and_prints_the_report_on_stderr(tmp_path):
    proc = watch(tmp_path, "train.py", "--steps", "30", "--lr", "1e-4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("done\n") and "gradscope Sequential" in proc.stderr


def test_a_script_that_raises_leaves_its_report_and_its_own_exit_code(tmp_path):
    proc = watch(tmp_path, "--format", "json", "--output", "r.json", "train.py", "--lr", "1e-4", "--raise-at", "12")
    assert proc.returncode == 1
    assert "RuntimeError: the data loader failed at step 12" in proc.stderr and "Traceback" in proc.stderr
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert doc["partial"] and doc["steps"] == 12 and "RuntimeError" in doc["stopped_reason"]


def test_a_script_sent_sigterm_leaves_its_report_and_exits_143(tmp_path):
    proc = watch(tmp_path, "--format", "json", "--output", "r.json", "train.py", "--lr", "1e-4", "--term-at", "7")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert doc["partial"] and doc["steps"] == 7 and "SIGTERM" in doc["stopped_reason"]


def test_the_module_form_runs_the_module_as_python_m_does(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("", encoding="utf-8")
    proc = watch(tmp_path, "--format", "json", "--output", "r.json", "-m", "pkg.train", "--steps", "40",
                 name="pkg/train.py")
    assert proc.returncode == 1, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["steps"] == 40


def test_the_scripts_own_norm_clipping_is_watched_before_it_clips(tmp_path):
    """clip_grad_norm_ is wrapped: the step is observed just before the script clips, and the report's
    clipping section says what its clipping did, as a Monitor told clip= says."""
    proc = watch(tmp_path, "--format", "json", "--output", "r.json", "train.py", "--steps", "30", "--lr", "1e-3",
                 "--clip", "1.0")
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert proc.returncode in (0, 1), proc.stderr
    assert doc["clipping"]["method"] == "norm" and doc["clipping"]["threshold"] == 1.0
    assert doc["measurement"].startswith("pre-clip gradients") and max(doc["global"]["norm"]) > 1.0
    assert doc["clipping"]["rate"] > 0


def test_bad_usage_is_one_line_and_exit_2(tmp_path):
    missing = watch(tmp_path, "nowhere.py")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    neither = watch(tmp_path, "--format", "json")
    assert neither.returncode == 2 and "SCRIPT or -m MODULE" in neither.stderr
    idle = watch(tmp_path, "idle.py", script="print('no training here')\n", name="idle.py")
    assert idle.returncode == 2 and idle.stdout == "no training here\n"
    assert "no optimizer step was observed" in idle.stderr


@pytest.mark.slow
def test_under_torchrun_two_ranks_give_one_report(tmp_path):
    script = textwrap.dedent('''
        import torch, torch.distributed as dist
        from torch import nn
        dist.init_process_group("gloo")
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(dist.get_rank())
        for step in range(12):
            x = torch.randn(16, 8, generator=g)
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
        dist.destroy_process_group()
        print("rank", dist.get_rank() if dist.is_initialized() else "done")
    ''')
    (tmp_path / "ddp.py").write_text(script, encoding="utf-8")
    from test_distributed import free_port
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "gradscope", "watch", "--format", "json", "--output", "r.json",
                           "ddp.py"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert doc["ranks"] == 2 and doc["steps"] == 12 and [layer["name"] for layer in doc["layers"]] == ["0", "2"]


LIGHTNING = '''
import torch
from torch import nn
import lightning.pytorch as pl


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


torch.manual_seed(0)
x = torch.randn(256, 8)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
trainer = pl.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, gradient_clip_val=0.5, accelerator="cpu")
trainer.fit(Regressor(), data)
print("fitted", trainer.global_step)
'''

TRAINER = '''
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
tokens = torch.randint(0, 64, (64, 16))
data = [{"input_ids": t, "labels": t} for t in tokens]
args = TrainingArguments(output_dir="out", max_steps=10, per_device_train_batch_size=8, learning_rate=1e-3,
                         report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, max_grad_norm=1.0,
                         disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=data).train()
print("trained")
'''


@pytest.mark.slow
def test_a_lightning_script_runs_unchanged_and_its_closure_steps_are_observed(tmp_path):
    """Lightning's automatic optimization runs backward inside optimizer.step(closure): the closure is
    wrapped, and its gradient_clip_val clipping seen before it clips."""
    proc = watch(tmp_path, "--format", "json", "--output", "r.json", "fit.py", script=LIGHTNING, name="fit.py")
    assert proc.returncode == 0, proc.stderr
    assert "fitted 12" in proc.stdout
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert doc["model"] == "Regressor" and doc["steps"] == 12
    assert [layer["name"] for layer in doc["layers"]] == ["net.0", "net.2"]
    assert doc["clipping"]["threshold"] == 0.5 and doc["measurement"].startswith("pre-clip")
    assert all(loss > 0 for loss in doc["global"]["loss"])


@pytest.mark.slow
def test_a_hugging_face_trainer_script_runs_unchanged(tmp_path):
    proc = watch(tmp_path, "--format", "json", "--output", "r.json", "hf.py", script=TRAINER, name="hf.py")
    assert proc.returncode == 0, proc.stderr
    assert "trained" in proc.stdout
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert doc["model"] == "GPT2LMHeadModel" and doc["steps"] == 10
    assert "transformer.h.0.attn.c_attn" in [layer["name"] for layer in doc["layers"]]
    assert doc["clipping"]["threshold"] == 1.0 and all(loss > 0 for loss in doc["global"]["loss"])


def test_two_optimizers_over_two_models_give_one_report_each(tmp_path):
    """A GAN-shaped script: a generator and a discriminator, each with its own optimizer; the JSON lists
    two reports, each naming its own model's layers."""
    script = textwrap.dedent('''
        import torch
        from torch import nn
        torch.manual_seed(0)
        generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        critic = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3)
        c_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
        for step in range(10):
            c_opt.zero_grad()
            fake = generator(torch.randn(16, 4)).detach()
            (critic(fake).mean() - critic(torch.randn(16, 8)).mean()).backward()
            c_opt.step()
            g_opt.zero_grad()
            (-critic(generator(torch.randn(16, 4))).mean()).backward()
            g_opt.step()
    ''')
    proc = watch(tmp_path, "--format", "json", "--output", "r.json", "--every", "2", "gan.py", script=script,
                 name="gan.py")
    assert proc.returncode == 0, proc.stderr
    docs = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert len(docs) == 2 and all(doc["steps"] == 5 for doc in docs)  # every 2nd of 10 steps
    assert [[layer["name"] for layer in doc["layers"]] for doc in docs] == [["0", "2"], ["0", "2"]]
    assert {doc["layers"][0]["params"] for doc in docs} == {8 * 16 + 16, 4 * 16 + 16}


def tensorboard_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing import event_accumulator
    (run,) = folder.iterdir()
    acc = event_accumulator.EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return ({tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]},
            acc.Tags()["tensors"])


def assert_streamed(logged: dict, doc: dict) -> None:
    """Every step's global norm as the report has it, and every layer's key, at every observed step."""
    norms = dict(zip(doc["global"]["steps"], doc["global"]["norm"]))
    got = logged["grad_norm/global"]
    assert sorted(got) == sorted(norms)
    for step, norm in norms.items():
        if norm is not None and norm == norm:
            assert got[step] == pytest.approx(norm, rel=1e-4), step
    for layer in doc["layers"]:
        assert len(logged[f"grad_norm/{layer['name']}"]) == len(norms)


def test_watch_streams_the_scripts_figures_and_findings_to_tensorboard(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    proc = watch(tmp_path, "--log", "tensorboard", "--format", "json", "--output", "r.json", "train.py", "--steps", "40")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    scalars, texts = tensorboard_scalars(tmp_path / "runs")
    assert_streamed(scalars, doc)
    assert "gradscope/findings/nonfinite-gradients/text_summary" in texts  # the explosion, as it happened


def test_watch_streams_to_the_scripts_own_mlflow_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store, no server or database
    script = SCRIPT.replace("torch.manual_seed(0)", "import mlflow\nmlflow.start_run()\ntorch.manual_seed(0)")
    uri = f"file://{tmp_path / 'mlruns'}"
    proc = watch(tmp_path, "--log", "mlflow", "--format", "json", "--output", "r.json", "train.py", "--steps", "24",
                 "--lr", "0.001", script=script, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(["0"])  # the script's own run, in the default experiment
    keys = ["grad_norm/global"] + [f"grad_norm/{layer['name']}" for layer in doc["layers"]]
    assert_streamed({k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in keys}, doc)


def test_watch_log_names_a_destination_it_knows(tmp_path):
    proc = watch(tmp_path, "--log", "neptune", "train.py")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "neptune" in proc.stderr
    assert not (tmp_path / "runs").exists()
