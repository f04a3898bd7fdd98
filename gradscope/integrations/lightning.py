"""PyTorch Lightning: ``GradscopeCallback`` profiles gradients where Lightning shows them pre-clip.

Lightning calls ``on_before_optimizer_step`` after the closure has run backward (and, under AMP, after
the GradScaler has unscaled the gradients), and before it clips them and steps: once per optimizer
step, so accumulated micro-batches are observed once, at the accumulation boundary. There is one
Monitor per optimizer, over that optimizer's parameters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import lightning.pytorch as pl
import torch

from ..run.clipper import Clipper
from .. import recorder
from ..analyse.clipping import LoopClipping
from ..errors import GradscopeError
from ..live import LiveLog, MlflowSink, TensorBoardSink, WandbSink
from ..monitor import Monitor
from ..report import Report
from ..analyse.ruleset import RuleSet
from .common import GradientHealthError, ReportSink

__all__ = ["ClipperCallback", "GradscopeCallback", "GradientHealthError"]


class GradscopeCallback(pl.Callback):
    """Observe every optimizer step of a fit and report on the gradients at the end.

    ``output`` and ``fail_on`` are as in :class:`~gradscope.integrations.common.ReportSink`: the report
    is printed or written at the end of fit, and findings at ``fail_on`` raise
    :class:`GradientHealthError`. ``update_every``, ``histogram_sample`` and ``every`` (observe every
    N-th optimizer step, as ``wandb.watch(log_freq=N)``) go to each :class:`~gradscope.Monitor`.

    The report says what the fit's own clipping did (the clip rate over the run, the post-clip norm, and
    the findings that it acts on every step, never, or no longer fits): from ``gradient_clip_val`` and
    ``gradient_clip_algorithm``, or from ``clip`` (as ``Monitor``'s: the :class:`~gradscope.Clipper` a
    :class:`ClipperCallback` applies, say).

    ``log`` streams the figures and the findings while the fit runs (see :mod:`gradscope.live`), with the
    Trainer's global step: ``"wandb"``, ``"mlflow"`` and ``"tensorboard"`` write to the Trainer's
    ``WandbLogger``, ``MLFlowLogger`` or ``TensorBoardLogger`` where it has one. With several optimizers,
    the first one's figures are streamed.
    """

    def __init__(self, rules: Union[None, str, Path, RuleSet] = None, output: Union[None, str, Path] = None,
                 fail_on: Optional[str] = None, update_every: int = 4, histogram_sample: int = 4, clip=None,
                 every: int = 1, log=None) -> None:
        self.clip = clip
        self.live_log = log  # not self.log: Lightning binds its LightningModule.log onto callbacks
        self.sink = ReportSink(rules, output, fail_on)
        self.monitor_options = {"update_every": update_every, "histogram_sample": histogram_sample, "every": every}
        self.monitors: Dict[int, Monitor] = {}
        self.reports: List[Report] = []

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        clip = self.clip
        if clip is None and trainer.gradient_clip_val:  # Lightning clips after on_before_optimizer_step, where the Monitor reads
            algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
            clip = LoopClipping(algorithm, float(trainer.gradient_clip_val), "Trainer's gradient_clip_val")
        live = _live_log(self.live_log, trainer)
        self.monitors = {id(opt): Monitor(pl_module, parameters=_parameters(opt), optimizer=opt, clip=clip,
                                          rules=self.sink.rules, log=live if k == 0 else None, **self.monitor_options)
                         for k, opt in enumerate(trainer.optimizers)}
        self.reports = []

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        monitor = self.monitors.get(id(_unwrap(optimizer)))
        if monitor is not None:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            monitor.observe(scaler=scaler)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            for monitor in self.monitors.values():
                if monitor.steps:
                    monitor.note_loss(loss)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """The fit raised (or was interrupted): write what was observed, marked partial with the reason. Under
        several processes rank 0 writes it, built without collectives, and names every rank that stopped
        (see ``gradscope.recorder.partial_report``)."""
        if not self.monitors:  # the fit had ended and its reports are written: this is the gate's own error
            return
        name = type(pl_module).__name__
        reports = []
        for k, monitor in enumerate(self.monitors.values()):
            if monitor.steps:
                label = name if len(self.monitors) == 1 else f"{name} (optimizer {k})"
                report = recorder.partial_report(monitor, self.sink.rules, type(exception), exception, name=label)
                if report is not None:
                    reports.append(report)
            monitor.close()
        self.monitors, self.reports = {}, reports
        if reports:
            self.sink.finish(reports, failure=exception)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        name = type(pl_module).__name__
        monitors, self.monitors = self.monitors, {}
        for k, monitor in enumerate(monitors.values()):
            if monitor.steps:
                label = name if len(monitors) == 1 else f"{name} (optimizer {k})"
                self.reports.append(monitor.report(self.sink.rules, name=label))
            monitor.close()
        self.sink.finish(self.reports, write=trainer.is_global_zero)


class ClipperCallback(pl.Callback):
    """Apply a :class:`~gradscope.Clipper` (the advice, with its skip guard) at every optimizer step.

    It acts in ``on_before_optimizer_step``, where the gradients are whole and unscaled and Lightning has
    not clipped them yet: leave ``gradient_clip_val`` unset, or Lightning would clip again after it. The
    guard also watches the loss of the step's last backward pass, and a step it skips is skipped by the
    optimizer as a whole (the Clipper is attached to the Trainer's optimizers at fit start). Its state (window, counters) is saved
    in Lightning's checkpoints with the callback's, so a resumed fit guards as the unbroken one would.
    """

    def __init__(self, clipper: Clipper) -> None:
        self.clipper = clipper
        self._loss: Optional[torch.Tensor] = None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.gradient_clip_val:
            raise GradscopeError("ClipperCallback clips, and the Trainer has gradient_clip_val set as well",
                                      "leave gradient_clip_val unset: the Clipper applies the advised clipping")
        for optimizer in trainer.optimizers:  # a skipped step then leaves the weights and the optimizer's state
            self.clipper.attach(_unwrap(optimizer))

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        self.clipper(pl_module, loss=self._loss)

    def state_dict(self) -> Dict[str, Any]:
        return {"clipper": self.clipper.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.clipper.load_state_dict(state_dict.get("clipper", {}))


def _live_log(log: Any, trainer: "pl.Trainer") -> Optional[LiveLog]:
    """``log`` as the fit's LiveLog: a destination's name means the Trainer's own logger of that kind where
    there is one; the steps count from the Trainer's global step."""
    if log is None or isinstance(log, LiveLog):
        return log
    if isinstance(log, str):
        from lightning.pytorch import loggers  # each logger imports its library only when used
        for logger in trainer.loggers:
            if log == "wandb" and isinstance(logger, loggers.WandbLogger):
                log = WandbSink(logger.experiment)
            elif log == "mlflow" and isinstance(logger, loggers.MLFlowLogger):
                log = MlflowSink(logger.experiment, logger.run_id)
            elif log == "tensorboard" and isinstance(logger, loggers.TensorBoardLogger):
                log = TensorBoardSink(logger.experiment)
            else:
                continue
            break
    return LiveLog(log, start=trainer.global_step)


def _parameters(optimizer: torch.optim.Optimizer) -> List[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _unwrap(optimizer: Any) -> Any:
    """Lightning may hand over its LightningOptimizer wrapper; the Monitor is keyed by the real one."""
    return getattr(optimizer, "optimizer", optimizer) if type(optimizer).__name__ == "LightningOptimizer" \
        else optimizer
