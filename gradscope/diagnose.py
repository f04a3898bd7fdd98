"""The diagnose pipeline: run real training steps under a Monitor, then statistics → findings → recommendation."""
from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch

from . import distributed, stats
from .errors import EXIT_INTERRUPTED, ExperimentError, GradscopeError, describe_exception
from .evaluate import evaluate
from .experiment import Experiment, batch_stream, compute_loss, to_device
from .monitor import Monitor
from .profile import Profile
from .recommend import recommend
from .report import Report
from .ruleset import RuleSet, load_rules

DEFAULT_STEPS = 30
MAX_STEPS = 50
Progress = Callable[[int, int, Dict[str, float]], None]


class Interrupted(GradscopeError):
    """Ctrl-C during profiling; ``partial`` holds the report of the steps done."""

    exit_code = EXIT_INTERRUPTED


def diagnose(
    experiment: Experiment,
    steps: int = DEFAULT_STEPS,
    rules: Union[None, str, Path, RuleSet] = None,
    *,
    seed: Optional[int] = None,
    device: Optional[str] = None,
    restore: bool = True,
    progress: Optional[Progress] = None,
) -> Report:
    """Train ``experiment`` for ``steps`` optimizer steps, observing every step, and return a Report.

    With ``restore=True`` (the default) the model's weights and train/eval mode, the optimizer's state
    and the global RNG states (torch, numpy, random) are put back afterwards, so profiling leaves no trace.
    ``device`` ("cpu", "cuda" or "auto") moves the model and batches there; None leaves them where they are.
    """
    if not isinstance(experiment, Experiment):
        raise ExperimentError(f"diagnose() takes a gradscope.Experiment, not {type(experiment).__name__}",
                              "wrap your model, optimizer and batches in gradscope.Experiment(...)")
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ExperimentError(f"steps must be between 1 and {MAX_STEPS}, got {steps}",
                              "a few dozen steps show the trend; use Monitor for whole training runs")
    rule_set = rules if isinstance(rules, RuleSet) else load_rules(rules)
    target = resolve_device(device)
    saved = _snapshot(experiment) if restore else None
    if seed is not None:
        seed_everything(seed)
    model, optimizer = experiment.model, experiment.optimizer
    if target is not None:
        model.to(target)
    monitor = Monitor(model, update_every=1, histogram_sample=1)  # a short run: measure everything
    stopped: Optional[str] = None
    meta = dict(rules=rule_set, model_name=experiment.display_name, seed=seed, steps_requested=steps)
    try:
        model.train()
        stream = batch_stream(experiment.batches)
        for step in range(steps):
            out = _train_step(experiment, monitor, stream, step, target or monitor.device)
            if progress is not None:
                progress(step + 1, steps, out)
            if not math.isfinite(out["loss"]):
                stopped = f"the loss was {out['loss']} at step {step}: stopped before optimizer.step()"
                break
            optimizer.step()
        profile = monitor.profile()  # before close(): it measures the last step's update
    except KeyboardInterrupt:
        raise Interrupted("interrupted: profiling stopped by Ctrl-C", "the partial report covers the steps done",
                          partial=_partial(monitor, "interrupted by Ctrl-C", meta)) from None
    except GradscopeError as exc:
        exc.partial = _partial(monitor, exc.problem, meta)
        raise
    finally:
        monitor.close()
        if saved is not None:
            _restore(experiment, saved)
    return build_report(profile, stopped_reason=stopped, **meta)


def _train_step(experiment: Experiment, monitor: Monitor, stream, step: int, device) -> Dict[str, float]:
    try:
        batch = next(stream)
    except GradscopeError:
        raise
    except Exception as exc:
        raise ExperimentError(f"getting batch {step} raised {describe_exception(exc)}",
                              "check Experiment.batches (re-run with --debug for the traceback)") from exc
    batch = to_device(batch, device)
    experiment.optimizer.zero_grad(set_to_none=True)
    try:
        loss = compute_loss(experiment, batch)
    except GradscopeError:
        raise
    except Exception as exc:
        raise ExperimentError(f"the forward pass or loss raised at step {step}: {describe_exception(exc)}",
                              "run one step of your model by hand to debug, or re-run with --debug") from exc
    if not loss.requires_grad:
        raise ExperimentError("the loss does not depend on any trainable parameter, so every gradient is None",
                              "compute the loss from the model's output without .detach(), .item() or no_grad()")
    try:
        loss.backward()
    except Exception as exc:
        raise ExperimentError(f"backward() raised at step {step}: {describe_exception(exc)}",
                              "run one step of your model by hand to debug, or re-run with --debug") from exc
    if step == 0 and all(p.grad is None for p in experiment.model.parameters() if p.requires_grad):
        raise ExperimentError("backward() produced no gradient for any parameter of the model",
                              "make the loss depend on Experiment.model's parameters")
    return monitor.observe(loss)


def build_report(profile: Profile, *, rules: Union[None, str, Path, RuleSet] = None, model_name: str = "model",
                 stopped_reason: Optional[str] = None, seed: Optional[int] = None,
                 steps_requested: Optional[int] = None) -> Report:
    """Statistics → findings → recommendation for one Profile."""
    rule_set = rules if isinstance(rules, RuleSet) else load_rules(rules)
    statistics = stats.compute(profile)
    findings = evaluate(statistics, rule_set)
    return Report(model=model_name, statistics=statistics, findings=findings,
                  recommendation=recommend(statistics, findings), rules=rule_set,
                  stopped_reason=stopped_reason, seed=seed, steps_requested=steps_requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _partial(monitor: Monitor, reason: str, meta: Dict[str, Any]) -> Optional[Report]:
    if monitor.steps == 0 or distributed.context() is not None:  # other ranks may not reach a collective
        return None
    return build_report(monitor.profile(), stopped_reason=reason, **meta)


def resolve_device(device: Optional[str]) -> Optional[torch.device]:
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ExperimentError(f"unknown device {device!r}", "use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExperimentError("--device cuda was asked for, but torch sees no CUDA GPU here",
                              "use --device cpu (or auto), or install a CUDA build of torch on a GPU machine")
    return torch.device(device)


def _snapshot(experiment: Experiment) -> Dict[str, Any]:
    model = experiment.model
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(experiment.optimizer.state_dict()),
        "modes": {name: m.training for name, m in model.named_modules()},
        "devices": {name: p.device for name, p in model.named_parameters()},
        "grads": {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": np.random.get_state(),
        "random_rng": random.getstate(),
    }


def _restore(experiment: Experiment, saved: Dict[str, Any]) -> None:
    model = experiment.model
    first = next(iter(saved["devices"].values()), None)
    if first is not None:
        model.to(first)
    model.load_state_dict(saved["model"])
    experiment.optimizer.load_state_dict(saved["optimizer"])
    for name, m in model.named_modules():
        if name in saved["modes"]:
            m.train(saved["modes"][name])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    np.random.set_state(saved["numpy_rng"])
    random.setstate(saved["random_rng"])
    for name, p in model.named_parameters():
        p.grad = saved["grads"].get(name)
