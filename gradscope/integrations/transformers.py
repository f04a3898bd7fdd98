"""Hugging Face Trainer: ``GradscopeTrainerCallback`` measures the gradient before the Trainer clips it.

The Trainer clips (``accelerator.clip_grad_norm_``) before any callback event of the step, so no
callback event sees pre-clip gradients. This callback instead watches backward itself: a gradient
hook on the parameters queues a function that autograd runs when the backward pass completes. On the
micro-batch that ends an accumulation cycle (the Trainer's own rule: every
``gradient_accumulation_steps`` micro-batches, and at the end of an epoch) the gradients are complete
and not yet clipped, and the Monitor observes them, dividing out the GradScaler's scale under fp16.
Losses come from a forward hook on the model (``output.loss``), averaged over the cycle.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union

import torch
from transformers import TrainerCallback

from .. import recorder
from ..run.clipper import Clipper
from ..analyse.clipping import LoopClipping
from ..errors import GradscopeError
from ..live import LiveLog, TensorBoardSink
from ..monitor import Monitor
from ..report import Report
from ..analyse.ruleset import RuleSet
from .common import GradientHealthError, ReportSink

__all__ = ["ClipperTrainerCallback", "GradscopeTrainerCallback", "GradientHealthError"]


class GradscopeTrainerCallback(TrainerCallback):
    """Observe every optimizer step of ``Trainer.train()`` pre-clip and report on the gradients at the end.

    ``output`` and ``fail_on`` are as in :class:`~gradscope.integrations.common.ReportSink`.
    ``update_every``, ``histogram_sample`` and ``every`` (observe every N-th optimizer step, as
    ``wandb.watch(log_freq=N)``) go to the :class:`~gradscope.Monitor`.

    The report says what the run's own clipping did (the clip rate over the run, the post-clip norm, and
    the findings that it acts on every step, never, or no longer fits): from ``max_grad_norm`` (1.0
    unless set), or from ``clip`` (as ``Monitor``'s: the Clipper a ``ClipperTrainerCallback`` applies).

    ``log`` streams the figures and the findings while training runs (see :mod:`gradscope.live`), with the
    Trainer's global step: ``"wandb"`` and ``"mlflow"`` write to the run the Trainer's ``report_to`` made
    (found when the first figures arrive), and ``"tensorboard"`` beside the Trainer's own TensorBoard
    logs (see ``_tensorboard_dir``).
    """

    def __init__(self, rules: Union[None, str, Path, RuleSet] = None, output: Union[None, str, Path] = None,
                 fail_on: Optional[str] = None, update_every: int = 4, histogram_sample: int = 4, clip=None,
                 every: int = 1, log=None) -> None:
        self.clip = clip
        self.live_log = log
        self.sink = ReportSink(rules, output, fail_on)
        self.monitor_options = {"update_every": update_every, "histogram_sample": histogram_sample, "every": every}
        self.monitor: Optional[Monitor] = None
        self.report: Optional[Report] = None
        self._handles: List[Any] = []
        self._queued = False
        self._micro_batch = 0
        self._losses: List[torch.Tensor] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        clip = self.clip
        if clip is None and args.max_grad_norm and args.max_grad_norm > 0:
            clip = LoopClipping("norm", float(args.max_grad_norm), "Trainer's max_grad_norm")
        log = self.live_log
        if log is not None and not isinstance(log, LiveLog):
            log = LiveLog(TensorBoardSink(log_dir=_tensorboard_dir(args)) if log == "tensorboard" else log,
                          start=state.global_step)
        self.monitor = Monitor(model, optimizer=getattr(optimizer, "optimizer", optimizer), clip=clip,
                               rules=self.sink.rules, log=log, **self.monitor_options)
        self._model = model
        self._accumulation = max(int(args.gradient_accumulation_steps), 1)
        self._steps_in_epoch = _length(train_dataloader)
        self._scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer carries it
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient)
                         for p in model.parameters() if p.requires_grad]
        self._handles.append(model.register_forward_hook(self._on_forward))

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._micro_batch = 0

    def _on_forward(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training and isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach())

    def _on_gradient(self, _param: torch.Tensor) -> None:
        if not self._queued:  # once per backward: run after every gradient of this pass has arrived
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        self._queued = False
        self._micro_batch += 1
        if self._micro_batch % self._accumulation and self._micro_batch != self._steps_in_epoch:
            return  # gradients are still accumulating
        loss = torch.stack(self._losses).float().mean() if self._losses else None
        self._losses = []
        self.monitor.observe(loss, scaler=self._scaler)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.monitor is None or not self.monitor.steps:
            return
        self.report = self.monitor.report(self.sink.rules, name=type(self._model).__name__)
        self.monitor.close()
        self.sink.finish([self.report], write=state.is_world_process_zero)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """``with callback.recording(): trainer.train()``: the Trainer has no callback event for a run that
        raises, so this block is where a partial report is written when ``train()`` raises, is
        interrupted, or gets SIGTERM (which then ends the process with 143), marked with the reason and
        the last step observed. Under several processes rank 0 writes it, built without collectives, and
        names every rank that stopped (see ``gradscope.recorder.partial_report``)."""
        previous = recorder.arm()
        try:
            yield
        except BaseException as exc:
            monitor = self.monitor
            if monitor is not None and monitor.steps and self.report is None:
                for handle in self._handles:
                    handle.remove()
                self._handles = []
                report = recorder.partial_report(monitor, self.sink.rules, type(exc), exc,
                                                 name=type(self._model).__name__)
                monitor.close()
                if report is not None:
                    self.report = report
                    self.sink.finish([report], failure=exc)
            raise
        finally:
            recorder.disarm(previous)


class ClipperTrainerCallback(TrainerCallback):
    """Apply a :class:`~gradscope.Clipper` (the advice, with its skip guard) before every optimizer step.

    It acts in ``on_pre_optimizer_step``, which the Trainer calls after its own clipping: set
    ``TrainingArguments(max_grad_norm=0)`` so that the Clipper sees the unclipped norm (it raises
    otherwise). The guard watches the norm (no callback event carries the loss). Its state rides in the
    optimizer's state dict, which the Trainer saves with each checkpoint; the Trainer loads a checkpoint
    before callbacks start, so on resuming the window refills over its first ``min_history`` steps.
    """

    def __init__(self, clipper: Clipper) -> None:
        self.clipper = clipper

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if args.max_grad_norm:
            raise GradscopeError(f"ClipperTrainerCallback clips, and max_grad_norm={args.max_grad_norm} clips "
                                      "before it", "pass TrainingArguments(max_grad_norm=0)")
        if optimizer is not None:
            self.clipper.attach(getattr(optimizer, "optimizer", optimizer))  # accelerate wraps it

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.clipper(model)


def _tensorboard_dir(args: Any) -> str:
    """Where the live log's TensorBoard events go: the Trainer's ``logging_dir`` (transformers 4), else
    ``TENSORBOARD_LOGGING_DIR`` as the Trainer's TensorBoard callback reads it, else ``runs/gradscope``
    under ``output_dir``, beside the Trainer's own ``runs/<date>`` (``tensorboard --logdir out/runs`` shows both)."""
    return (getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
            or os.path.join(args.output_dir, "runs", "gradscope"))


def _length(loader: Any) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:  # an iterable dataset: epochs end only by max_steps
        return None
