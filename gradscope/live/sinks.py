"""Where the live log goes: a function of yours, or the W&B, MLflow or TensorBoard run you already have.

``log=`` is one of:

- a callable ``sink(metrics, step)``; if it also has an ``event`` method, ``sink.event(event)`` receives
  the findings (:class:`~gradscope.live.findings.Event`);
- ``"wandb"``: the active W&B run (``wandb.run``, as ``wandb.init()`` or Lightning's ``WandbLogger`` made
  it), or a run object. The keys are logged with ``gradscope/step``, the optimizer step, as their
  x-axis (``define_metric``), so they sit beside the run's own logging whatever its step counter says;
  a finding is a W&B alert;
- ``"mlflow"``: MLflow's active run (or :class:`MlflowSink` with a client and a run id). A flush's steps go
  in one ``log_batch``; a finding is a tag, ``gradscope.finding.<rule>``. MLflow allows letters, digits,
  ``_ - . / :`` and spaces in a key: any other character of a layer's name becomes ``_``;
- ``"tensorboard"``, or a ``SummaryWriter``: scalars with the keys as tags, and a finding as a text entry
  under ``gradscope/findings``. ``"tensorboard"`` alone writes to a new ``SummaryWriter()`` (``runs/``),
  which is closed at the end; a writer of yours is flushed, not closed.

The libraries are optional: naming one that is not installed is an error at once, with the command that
installs it. A target that is missing when the first figures arrive (no W&B run, no MLflow run) is one
warning, and the live log stops; training goes on, and the report is unaffected.
"""
from __future__ import annotations

import abc
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import GradscopeError

NAMES = ("wandb", "mlflow", "tensorboard")
STEP_KEY = "gradscope/step"
PREFIXES = ("grad_norm/*", "grad_norm_group/*", "clip/*", "guard/*", "gradscope/*")
MLFLOW_BATCH = 1000  # MLflow's limit on metrics in one log_batch
_MLFLOW_KEY = re.compile(r"[^\w\-./: ]")

Rows = List[Tuple[Dict[str, float], int]]


class SinkMissing(GradscopeError):
    """The run a sink writes to is not there when the first figures arrive."""


class Sink(abc.ABC):
    """A destination: several steps' metrics at once (``rows``: ``(metrics, step)``), a finding as an event,
    and the end of the run."""

    name = "the sink"

    def __repr__(self) -> str:
        return self.name

    @abc.abstractmethod
    def metrics(self, rows: Rows) -> None:
        """Log ``rows``, each a step's ``{key: value}`` and its optimizer step, in order."""

    def event(self, event: Any) -> None:
        """A finding, as the destination shows one; by default none."""

    def finish(self) -> None:
        """The run ended: make what was logged durable."""


class CallableSink(Sink):
    """``fn(metrics, step)`` for every step; ``fn.event(event)`` for every finding, where ``fn`` has it."""

    def __init__(self, fn: Callable[[Dict[str, float], int], Any]) -> None:
        self.fn = fn

    def metrics(self, rows: Rows) -> None:
        for metrics, step in rows:
            self.fn(metrics, step)

    def event(self, event: Any) -> None:
        handler = getattr(self.fn, "event", None)
        if callable(handler):
            handler(event)

    def __repr__(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)


class WandbSink(Sink):
    name = "W&B"
    """A W&B run: ``run``, or the active one (``wandb.run``) when the first figures arrive."""

    def __init__(self, run: Any = None) -> None:
        self._wandb = _need("wandb", "wandb")
        self._run, self._defined = run, False

    def _target(self) -> Any:
        run = self._run or self._wandb.run
        if run is None:
            raise SinkMissing("log='wandb' but there is no W&B run", "call wandb.init() before training, or use "
                              "Lightning's WandbLogger or the Trainer's report_to='wandb'")
        if not self._defined:  # the optimizer step as these keys' x-axis, beside the run's own step counter
            run.define_metric(STEP_KEY)
            for prefix in PREFIXES:
                run.define_metric(prefix, step_metric=STEP_KEY)
            self._run, self._defined = run, True
        return run

    def metrics(self, rows: Rows) -> None:
        run = self._target()
        for metrics, step in rows:
            run.log({**metrics, STEP_KEY: step})

    def event(self, event: Any) -> None:
        level = {"error": "ERROR", "warning": "WARN"}.get(event.severity, "INFO")
        self._target().alert(title=event.title, text=str(event), level=getattr(self._wandb.AlertLevel, level))


class MlflowSink(Sink):
    name = "MLflow"
    """An MLflow run: ``run_id`` through ``client`` (an ``MlflowClient``), or the active run when the first
    figures arrive."""

    def __init__(self, client: Any = None, run_id: Optional[str] = None) -> None:
        self._mlflow = _need("mlflow", "mlflow")
        self._client, self._run_id = client, run_id

    def _target(self) -> Tuple[Any, str]:
        if self._run_id is None:
            run = self._mlflow.active_run()
            if run is None:
                raise SinkMissing("log='mlflow' but there is no active MLflow run",
                                  "call mlflow.start_run() before training, or pass MlflowSink(client, run_id)")
            self._run_id = run.info.run_id
        if self._client is None:
            self._client = self._mlflow.tracking.MlflowClient()
        return self._client, self._run_id

    def metrics(self, rows: Rows) -> None:
        from mlflow.entities import Metric
        client, run_id = self._target()
        now = int(time.time() * 1000)
        batch = [Metric(_MLFLOW_KEY.sub("_", key), value, now, step) for metrics, step in rows
                 for key, value in metrics.items()]
        for start in range(0, len(batch), MLFLOW_BATCH):
            client.log_batch(run_id, metrics=batch[start:start + MLFLOW_BATCH])

    def event(self, event: Any) -> None:
        client, run_id = self._target()
        client.set_tag(run_id, f"gradscope.finding.{event.rule}", str(event)[:5000])


class TensorBoardSink(Sink):
    name = "TensorBoard"
    """A ``SummaryWriter``: ``writer``, or a new one (``SummaryWriter(log_dir)``; ``runs/`` by default) made
    when the first figures arrive and closed at the end."""

    def __init__(self, writer: Any = None, log_dir: Optional[str] = None) -> None:
        if writer is None:
            _need("torch.utils.tensorboard", "tensorboard")
        self._writer, self._log_dir, self._owned = writer, log_dir, writer is None

    def _target(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=self._log_dir)
        return self._writer

    def metrics(self, rows: Rows) -> None:
        writer = self._target()
        for metrics, step in rows:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)

    def event(self, event: Any) -> None:
        self._target().add_text(f"gradscope/findings/{event.rule}", f"**{event.severity}** {event}", event.step)

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            if self._owned:
                self._writer.close()


def sink_of(log: Any) -> Sink:
    """``log`` as a :class:`Sink` (see the module's docstring); a value it cannot be is an error."""
    if isinstance(log, Sink):
        return log
    if isinstance(log, str):
        if log not in NAMES:
            raise GradscopeError(f"log={log!r} is not a destination gradscope knows",
                                 f"use one of {', '.join(map(repr, NAMES))}, a SummaryWriter, or a function "
                                 "sink(metrics, step)")
        return {"wandb": WandbSink, "mlflow": MlflowSink, "tensorboard": TensorBoardSink}[log]()
    if callable(getattr(log, "add_scalar", None)) and callable(getattr(log, "add_text", None)):
        return TensorBoardSink(log)  # a SummaryWriter, or anything that writes as one
    if callable(getattr(log, "define_metric", None)) and callable(getattr(log, "alert", None)):
        return WandbSink(log)  # a W&B run
    if callable(log):
        return CallableSink(log)
    raise GradscopeError(f"log={log!r}: not a destination", "pass a function sink(metrics, step), 'wandb', "
                         "'mlflow', 'tensorboard' or a SummaryWriter")


def _need(module: str, package: str) -> Any:
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise GradscopeError(f"log={package!r} needs the {package} package",
                             f"pip install {package}") from None
