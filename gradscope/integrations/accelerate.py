"""Hugging Face Accelerate: ``GradscopeAccelerate`` observes a hand-written Accelerate loop.

An Accelerate loop is the user's own, so the Monitor observes it as a plain loop does, after
``accelerator.backward`` and before ``accelerator.clip_grad_norm_`` and ``optimizer.step()``. What
Accelerate adds, this handles: under ``accelerator.accumulate(model)`` the gradients are whole only
where ``accelerator.sync_gradients`` is set (every ``gradient_accumulation_steps`` micro-batches, and at
the end of the data), so only those calls are observed and the micro-batches' losses are averaged into
them; under fp16 the accelerator's GradScaler is passed, so the figures are unscaled and a step the
scaler skips is counted as skipped; the model is measured through its DDP or FSDP wrapper under
``accelerate launch``; and the report is written on the main process alone, gated by ``fail_on`` on
every process. Used as a context manager, it writes a partial report, marked with the reason and the
last step, when the loop raises, is interrupted, or gets SIGTERM, as the other integrations do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..analyse.ruleset import RuleSet
from .. import recorder
from ..collect.losses import Losses
from ..collect.observer import Observation
from ..monitor import Monitor
from ..report import Report
from .common import GradientHealthError, ReportSink

__all__ = ["GradscopeAccelerate", "GradientHealthError"]


class GradscopeAccelerate:
    """Observe an Accelerate loop's optimizer steps pre-clip and report on the gradients at the end.

    ``accelerator`` and the prepared ``model``; ``optimizer`` (prepared or not) tells the report whether
    the optimizer is Adam's family; ``clip`` is the threshold the loop passes to
    ``accelerator.clip_grad_norm_`` (or a pair, as ``Monitor``'s), so that the report says what it did.
    ``output`` and ``fail_on`` are as in :class:`~gradscope.integrations.common.ReportSink`;
    ``update_every``, ``histogram_sample`` and ``every`` go to the :class:`~gradscope.Monitor`.
    ``log`` streams the figures and the findings while the loop runs (see :mod:`gradscope.live`), from the
    main process: ``"wandb"`` and ``"tensorboard"`` write to the accelerator's tracker of that kind
    (``Accelerator(log_with=...)``) where it has one, ``"mlflow"`` to the active run.
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module, *, optimizer: Any = None, clip=None,
                 rules: Union[None, str, Path, RuleSet] = None, output: Union[None, str, Path] = None,
                 fail_on: Optional[str] = None, update_every: int = 4, histogram_sample: int = 4,
                 every: int = 1, log=None) -> None:
        self.accelerator = accelerator
        self.sink = ReportSink(rules, output, fail_on)
        self.monitor = Monitor(model, optimizer=getattr(optimizer, "optimizer", optimizer), clip=clip,
                               update_every=update_every, histogram_sample=histogram_sample, every=every,
                               rules=self.sink.rules, log=_tracker(accelerator, log))
        self.report: Optional[Report] = None
        self._losses = Losses(self.monitor.device)  # the micro-batches' losses since the last sync
        self._sigterm: Optional[Any] = None  # the SIGTERM handler armed over, inside ``with``

    def observe(self, loss: Optional[torch.Tensor] = None) -> Optional[Observation]:
        """Call after ``accelerator.backward(loss)``, before clipping and ``optimizer.step()``, with the
        micro-batch's loss: on the micro-batch that syncs the gradients the step is measured (with the
        mean loss of its micro-batches); on the others the loss is kept and None returned."""
        if loss is not None:
            self._losses.note(loss)
        if not self.accelerator.sync_gradients:
            return None
        return self.monitor.observe(self._losses.take() if self._losses.waiting else None,
                                    scaler=self.accelerator.scaler)

    def finish(self, name: Optional[str] = None) -> Report:
        """The end of training: the report (every process builds it: under several it takes collectives),
        printed or written on the main process, and :class:`GradientHealthError` raised on every process
        where it fails ``fail_on``. The report stays in ``.report``."""
        self.report = self.monitor.report(self.sink.rules, name=name)
        self.monitor.close()
        self.sink.finish([self.report], write=self.accelerator.is_main_process)
        return self.report

    def __enter__(self) -> "GradscopeAccelerate":
        self._sigterm = recorder.arm()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """A normal end finishes (unless ``finish`` was called); a loop that raised, was interrupted or got
        SIGTERM leaves a partial report, and its own exception goes on."""
        previous, self._sigterm = self._sigterm, None
        try:
            if exc_type is None:
                if self.report is None:
                    self.finish()
            elif self.monitor.steps and self.report is None:
                report = recorder.partial_report(self.monitor, self.sink.rules, exc_type, exc)
                self.monitor.close()
                if report is not None:
                    self.report = report
                    self.sink.finish([report], failure=exc)
        finally:
            recorder.disarm(previous)


def _tracker(accelerator: Any, log: Any) -> Any:
    """``"wandb"`` or ``"tensorboard"`` as the accelerator's tracker of that kind, where it has one (its
    W&B run, its SummaryWriter); anything else as given."""
    if log in ("wandb", "tensorboard") and any(getattr(t, "name", None) == log for t in accelerator.trackers):
        return accelerator.get_tracker(log, unwrap=True)
    return log
