"""The Experiment contract: a model, its optimizer (and learning-rate schedule), its batches and its loss,
and how one step runs."""
from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import USER_ERRORS, ExperimentError, GradscopeError, describe_exception

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclasses.dataclass
class Experiment:
    """What ``gradscope diagnose`` trains for a few steps.

    ``batches`` is any iterable of batches (cycled when it runs out) or a zero-argument callable that
    returns one batch per call. ``loss_fn(model, batch)`` returns a scalar tensor; when it is omitted, a
    dict batch is passed as ``model(**batch)`` and the output's ``.loss`` is used, and any other batch is
    passed as ``model(*batch)`` and the output must itself be the scalar loss. ``scheduler``, a learning-rate
    scheduler over ``optimizer`` (a warm-up, a cosine decay), is stepped after every optimizer step, as a
    training loop steps it, so the profile and the trials see the learning rates the run will.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Union[Iterable, Callable[[], Batch]]
    loss_fn: Optional[LossFn] = None
    name: Optional[str] = None
    scheduler: Optional[Any] = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ExperimentError(
                f"Experiment.model is a {type(self.model).__name__}, not a torch.nn.Module",
                "return Experiment(model=<your nn.Module>, ...)",
            )
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ExperimentError(
                f"Experiment.optimizer is a {type(self.optimizer).__name__}, not a torch.optim.Optimizer",
                "build it over the model's parameters, e.g. torch.optim.AdamW(model.parameters())",
            )
        _check_holds_model(self.model, self.optimizer)
        if self.scheduler is not None:
            _check_scheduler(self.scheduler, self.optimizer)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ExperimentError("Experiment.loss_fn is not callable", "pass loss_fn(model, batch) -> tensor")
        if not (callable(self.batches) or isinstance(self.batches, Iterable)):
            raise ExperimentError(
                f"Experiment.batches is a {type(self.batches).__name__}: neither iterable nor callable",
                "pass a DataLoader, a list of batches, a generator, or a zero-argument function",
            )

    @property
    def display_name(self) -> str:
        return self.name or type(self.model).__name__


def _check_holds_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer that holds none of the model's trainable parameters (built over another model, or over a
    copy of this one) never moves it: its gradients pile up unzeroed and a profile would read that as a rising
    norm. One clear error instead. Holding some of them is a choice (a second optimizer may hold the rest)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if trainable and not any(id(p) in held for p in trainable):
        raise ExperimentError(
            f"Experiment.optimizer holds none of the model's {len(trainable)} trainable parameters, so no step "
            "would move the model",
            "build the optimizer over this model's parameters, after any copy or move: "
            "torch.optim.AdamW(model.parameters())",
        )


def _check_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """A scheduler gradscope can step once per step and put back: a per-step one over this optimizer."""
    kind = type(scheduler).__name__
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ExperimentError("Experiment.scheduler is a ReduceLROnPlateau, which steps on a validation metric "
                              "that diagnose does not compute",
                              "leave it out: it would not act within a profile of a few dozen steps")
    if not all(callable(getattr(scheduler, name, None)) for name in ("step", "state_dict", "load_state_dict")):
        raise ExperimentError(f"Experiment.scheduler is a {kind}, not a learning-rate scheduler",
                              "pass a torch.optim.lr_scheduler scheduler (with step() and state_dict()), or None")
    if getattr(scheduler, "optimizer", optimizer) is not optimizer:
        raise ExperimentError(f"Experiment.scheduler ({kind}) schedules another optimizer, not Experiment.optimizer",
                              "build the scheduler over the same optimizer object you pass as optimizer")


def batch_stream(batches: Union[Iterable, Callable[[], Batch]]) -> Iterator[Batch]:
    """Yield batches for ever: call a factory, or cycle an iterable (caching a one-shot iterator)."""
    if callable(batches) and not isinstance(batches, Iterable):
        while True:
            yield batches()
    if iter(batches) is not batches:  # re-iterable: a list, a DataLoader
        while True:
            empty = True
            for batch in batches:
                empty = False
                yield batch
            if empty:
                raise ExperimentError("Experiment.batches is empty", "give it at least one batch")
    seen = []  # a generator can be walked once: keep what it gave and cycle that
    for batch in batches:
        seen.append(batch)
        yield batch
    if not seen:
        raise ExperimentError("Experiment.batches is empty", "give it at least one batch")
    yield from itertools.cycle(seen)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor inside a batch (tensors, tuples, lists, dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def compute_loss(experiment: Experiment, batch: Batch) -> torch.Tensor:
    """Run the forward pass and return the scalar loss, by the Experiment contract."""
    model = experiment.model
    if experiment.loss_fn is not None:
        loss = experiment.loss_fn(model, batch)
        where = "loss_fn(model, batch)"
    elif isinstance(batch, Mapping):
        output = model(**batch)
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", output)
        where = "model(**batch).loss"
        if loss is None:
            raise ExperimentError(
                f"{where} is None: the model computed no loss",
                "include the targets in the batch (e.g. 'labels') or give the Experiment a loss_fn",
            )
    else:
        output = model(*batch) if isinstance(batch, (list, tuple)) else model(batch)
        loss = output
        where = "model(*batch)"
    if not isinstance(loss, torch.Tensor):
        raise ExperimentError(
            f"{where} returned {type(loss).__name__}, not a tensor",
            "give the Experiment a loss_fn(model, batch) that returns a scalar tensor",
        )
    if loss.numel() != 1:
        raise ExperimentError(
            f"{where} returned a tensor of shape {tuple(loss.shape)}, not a scalar loss",
            "reduce it (e.g. .mean()) or give the Experiment a loss_fn that returns a scalar",
        )
    return loss.reshape(())


def next_batch(stream: Iterator[Batch], step: int) -> Batch:
    """The next batch of the stream, with a user error named as such."""
    try:
        return next(stream)
    except GradscopeError:
        raise
    except USER_ERRORS as exc:
        raise ExperimentError(f"getting batch {step} raised {describe_exception(exc)}",
                              "check Experiment.batches") from exc


def forward_backward(experiment: Experiment, batch: Batch, step: int, device: torch.device) -> torch.Tensor:
    """One step's gradients: zero them, run the forward pass and the loss, and backward. Returns the loss.

    Every training step gradscope runs goes through here (profiling and trials alike), so each gets
    the same checks and the same one-line errors.
    """
    batch = to_device(batch, device)
    experiment.optimizer.zero_grad(set_to_none=True)
    try:
        loss = compute_loss(experiment, batch)
    except GradscopeError:
        raise
    except USER_ERRORS as exc:
        raise ExperimentError(f"the forward pass or loss raised at step {step}: {describe_exception(exc)}",
                              "run one step of your model by hand to see where it fails") from exc
    if not loss.requires_grad:
        raise ExperimentError("the loss does not depend on any trainable parameter, so every gradient is None",
                              "compute the loss from the model's output without .detach(), .item() or no_grad()")
    try:
        loss.backward()
    except USER_ERRORS as exc:
        raise ExperimentError(f"backward() raised at step {step}: {describe_exception(exc)}",
                              "run one step of your model by hand to see where it fails") from exc
    if step == 0 and all(p.grad is None for p in experiment.model.parameters() if p.requires_grad):
        raise ExperimentError("backward() produced no gradient for any parameter of the model",
                              "make the loss depend on Experiment.model's parameters")
    return loss


def optimizer_step(experiment: Experiment, step: int) -> None:
    """``optimizer.step()``, then the scheduler's ``step()`` if there is one, with an error from either
    named as the user's."""
    _as_users(experiment.optimizer.step, "optimizer.step()", step,
              "check the optimizer (one that needs a closure, such as LBFGS, is not supported)")
    if experiment.scheduler is not None:
        _as_users(experiment.scheduler.step, "scheduler.step()", step,
                  "check Experiment.scheduler (a schedule that runs out, such as OneCycleLR's total_steps, "
                  "must cover the profile and the trials)")


def _as_users(call: Callable[[], Any], what: str, step: int, hint: str) -> None:
    """Run ``call``; an error from it becomes one line that names it as the user's code, with ``hint``."""
    try:
        call()
    except GradscopeError:
        raise
    except USER_ERRORS as exc:
        raise ExperimentError(f"{what} raised at step {step}: {describe_exception(exc)}", hint) from exc


def median_or_inf(losses: Sequence[float]) -> float:
    """The median held-out loss (inf if any batch's is not finite): one outlier batch does not decide."""
    return float(statistics.median(losses)) if losses and all(map(math.isfinite, losses)) else math.inf


def held_out_losses(experiment: Experiment, batches: Sequence[Batch], device: torch.device) -> Tuple[float, ...]:
    """The loss on each held-out batch, in eval mode without gradients."""
    model = experiment.model
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            losses = [float(compute_loss(experiment, to_device(b, device))) for b in batches]
    except GradscopeError:
        raise
    except USER_ERRORS as exc:
        raise ExperimentError(f"the loss on a held-out batch raised {describe_exception(exc)}",
                              "the model must run in eval mode under torch.no_grad() too") from exc
    finally:
        for m, mode in modes:
            m.training = mode
    return tuple(losses)
