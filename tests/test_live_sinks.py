"""The live log against the real libraries, in their offline modes: W&B offline (its run file read back
record by record), MLflow's file store (read back through its client), TensorBoard's event files (read
back with its EventAccumulator); and ``log=`` on the Lightning, Trainer and Accelerate integrations."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from gradscope import LiveLog, Monitor

from models import MLP, mse, regression_batches


def train(log, steps=24, blow_up_at=None, **options):
    """An MLP's loop with ``log=``; a gradient is made infinite from ``blow_up_at`` on. Returns the report."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = regression_batches()
    with Monitor(model, log=log, flush_every=4, **options) as monitor:
        for k in range(steps):
            opt.zero_grad()
            loss = mse(model, batches())
            loss.backward()
            if blow_up_at is not None and k >= blow_up_at:
                model.out.weight.grad[0, 0] = float("inf")
            monitor.observe(loss)
            if blow_up_at is None:
                opt.step()
        report = monitor.report()
    return report


def expected(report):
    """{key: {step: value}} of what the report holds, for the keys every sink gets."""
    m = report.statistics.model
    out = {"grad_norm/global": dict(zip(m.series_steps.tolist(), m.global_norm.tolist())),
           "gradscope/loss": dict(zip(m.series_steps.tolist(), m.loss.tolist()))}
    for layer in report.statistics.active_layers:
        out[f"grad_norm/{layer.name}"] = dict(zip(m.series_steps.tolist(), layer.norm_series.tolist()))
    return out


def assert_same(got, report):
    """``got`` ({key: {step: value}}) holds every key of the report's, at every step, within 1e-5."""
    for key, by_step in expected(report).items():
        assert sorted(got.get(key, {})) == sorted(by_step), key
        steps = sorted(by_step)
        np.testing.assert_allclose([got[key][s] for s in steps], [by_step[s] for s in steps], rtol=1e-5,
                                   err_msg=key)


# -- W&B -------------------------------------------------------------------------------------------------
def wandb_records(run_dir):
    """The records of a W&B run file (LevelDB's log format: 32 KiB blocks of chunks with a 7-byte header,
    after W&B's own 7-byte header), parsed by W&B's own protobuf."""
    from wandb.proto import wandb_internal_pb2
    path = next(run_dir.glob("*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_logged(run_dir):
    import json
    series, alerts = {}, []
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "gradscope/step" in row:
                for key, value in row.items():
                    series.setdefault(key, {})[int(row["gradscope/step"])] = value
        elif kind == "alert":
            alerts.append(record.alert)
    return series, alerts


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb.teardown()  # W&B reads its environment once per process setup: a run earlier in the suite set it up
    yield wandb
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def test_wandb_offline_receives_every_layer_and_an_alert(offline_wandb, tmp_path):
    run = offline_wandb.init(project="gradscope-test", dir=str(tmp_path), mode="offline")
    report = train("wandb", steps=40, blow_up_at=36)
    run.finish()
    series, alerts = wandb_logged(next((tmp_path / "wandb").glob("offline-run-*")))
    assert_same(series, report)
    assert [(a.title, a.level) for a in alerts] == [("gradscope: nonfinite-gradients", "ERROR")]
    assert "non-finite gradient values" in alerts[0].text


# -- MLflow ----------------------------------------------------------------------------------------------
@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store, no server or database
    mlflow.set_tracking_uri(f"file://{tmp_path / 'mlruns'}")
    yield mlflow
    if mlflow.active_run() is not None:
        mlflow.end_run()


def mlflow_logged(mlflow, run_id, keys):
    client = mlflow.tracking.MlflowClient()
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}


def test_mlflow_file_store_receives_every_layer_and_a_tag(mlflow_store):
    with mlflow_store.start_run() as run:
        report = train("mlflow", steps=40, blow_up_at=36)
    assert_same(mlflow_logged(mlflow_store, run.info.run_id, expected(report)), report)
    tags = mlflow_store.tracking.MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["gradscope.finding.nonfinite-gradients"].startswith("error nonfinite-gradients at step ")


# -- TensorBoard -----------------------------------------------------------------------------------------
def tensorboard_logged(folder):
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    texts = {tag: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}
    return scalars, texts


def test_a_summary_writer_receives_every_layer_and_a_text_entry(tmp_path):
    SummaryWriter = pytest.importorskip("torch.utils.tensorboard").SummaryWriter
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    report = train(writer, steps=40, blow_up_at=36)
    scalars, texts = tensorboard_logged(tmp_path / "tb")  # the Monitor flushed the writer at the end
    assert_same(scalars, report)
    (text,) = texts["gradscope/findings/nonfinite-gradients/text_summary"]
    assert text.startswith("**error** error nonfinite-gradients at step ")
    writer.close()


def test_tensorboard_by_name_writes_a_writer_of_its_own(tmp_path, monkeypatch):
    pytest.importorskip("torch.utils.tensorboard")
    monkeypatch.chdir(tmp_path)
    report = train("tensorboard")
    (folder,) = (tmp_path / "runs").iterdir()
    assert_same(tensorboard_logged(folder)[0], report)


# -- the integrations ------------------------------------------------------------------------------------
def lightning_fit(tmp_path, log, logger, steps=8):
    pl = pytest.importorskip("lightning.pytorch")
    from gradscope.integrations.lightning import GradscopeCallback
    from test_lightning import Regressor, loader
    torch.manual_seed(0)
    callback = GradscopeCallback(output=tmp_path / "report.json", log=log)
    pl.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[callback], max_steps=steps,
               default_root_dir=str(tmp_path)).fit(Regressor(), loader())
    return callback.reports[0]


def test_lightning_streams_to_its_wandb_logger(offline_wandb, tmp_path):
    from lightning.pytorch.loggers import WandbLogger
    logger = WandbLogger(project="gradscope-test", save_dir=str(tmp_path), offline=True, mode="offline")
    report = lightning_fit(tmp_path, "wandb", logger)
    run_dir = logger.experiment.dir
    offline_wandb.finish()
    from pathlib import Path
    series, _ = wandb_logged(Path(run_dir).parent)
    assert_same(series, report)


def test_lightning_streams_to_its_mlflow_logger(mlflow_store, tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger
    logger = MLFlowLogger(tracking_uri=f"file://{tmp_path / 'mlruns'}")
    report = lightning_fit(tmp_path, "mlflow", logger)
    assert_same(mlflow_logged(mlflow_store, logger.run_id, expected(report)), report)


def test_lightning_streams_to_its_tensorboard_logger(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    report = lightning_fit(tmp_path, "tensorboard", logger)
    logger.experiment.flush()
    assert_same(tensorboard_logged(logger.log_dir)[0], report)


def test_the_trainer_callback_streams_with_the_trainers_steps(tmp_path):
    pytest.importorskip("transformers")
    from test_transformers import train as hf_train
    got = {}

    def sink(metrics, step):
        for key, value in metrics.items():
            got.setdefault(key, {})[step] = value

    report, logged, _ = hf_train(tmp_path, 0.0, steps=5, log=sink)
    assert_same(got, report)
    assert sorted(got["grad_norm/global"]) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose([got["grad_norm/global"][s] for s in range(5)], logged, rtol=1e-5)


def test_the_trainer_callback_streams_to_tensorboard_beside_the_trainers_logs(tmp_path):
    pytest.importorskip("transformers")
    from test_transformers import train as hf_train
    report, _, _ = hf_train(tmp_path, 0.0, steps=5, log="tensorboard")
    folder = tmp_path / "out" / "runs" / "gradscope"
    assert_same(tensorboard_logged(folder)[0], report)


def test_the_accelerate_helper_streams():
    pytest.importorskip("accelerate")
    from test_accelerate import train as accelerate_train
    got = {}

    def sink(metrics, step):
        for key, value in metrics.items():
            got.setdefault(key, {})[step] = value

    helper, reference, _ = accelerate_train(log=LiveLog(sink))
    assert_same(got, helper.report)
    np.testing.assert_allclose([got["grad_norm/global"][s] for s in range(len(reference))], reference, rtol=1e-5)
