"""Apply the advice: clip a model's gradients exactly as a Recommendation says (norm, value, AGC or adaptive),
with the skip-step guard where it says so."""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Union

import torch
from torch import nn

from ...collect import distributed
from ...errors import GradscopeError
from .guard_state import GuardState, total_norm
from .skipping import StepSkipper
from ...advise.guards import Adaptive, Skip
from ...analyse import clipping
from ...report import WRITE_JSON_HINT, Report

METHODS = clipping.METHODS + (clipping.NONE,)  # what a Clipper applies: the ways to clip, or none
STATE_KEY = "gradscope_clipper"  # the Clipper's state inside an attached optimizer's state dict



class Clipper:
    """Clip gradients in place, between ``backward()`` and ``optimizer.step()``: ``clipper(model)``.

    ``norm`` and ``value`` call ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_``. ``agc`` is
    adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition
    Without Normalization"): each unit's gradient (a row of a weight, over all but its first dimension)
    is rescaled to at most ``threshold`` x max(‖unit weight‖, ``eps``). As in that paper, the final
    linear layer is left out unless ``exclude`` names other modules (``exclude=()`` clips every layer).
    ``none`` clips nothing unless ``safety_net`` is given: then the global norm is clipped at that
    generous threshold, which only a blow-up reaches. ``adaptive`` is ZClip's norm threshold that follows
    the running norm (see ``gradscope.advise.guards.Adaptive``); its ``threshold`` is the z-score (2.5 in ZClip).

    ``skip=Skip()`` arms the skip-step guard beside any method: a step whose global norm, or loss when
    ``clipper(model, loss=loss)`` is given it, is more than ``z`` standard deviations above the last
    ``window`` steps is skipped, within the bounds that make a new level re-base the guard (see
    ``gradscope.Skip``). Attach the Clipper to the optimizer (``attach(optimizer)``) and a skipped step
    leaves the weights and the optimizer's state exactly as they were; unattached, the skip only zeroes
    the gradient. Guarded and adaptive steps make no host sync; ``counts()`` reads what they did, and
    ``state_dict()`` (or ``attach(optimizer)``, which rides in the optimizer's state dict) saves it for a
    resumed run.
    """

    def __init__(self, method: str, threshold: Optional[float], *, eps: float = 1e-3,
                 exclude: Optional[Iterable[str]] = None, safety_net: Optional[float] = None,
                 skip: Optional[Skip] = None, alpha: float = 0.97, warmup: int = 25) -> None:
        if method not in METHODS:
            raise GradscopeError(f"unknown clipping method {method!r}", f"use one of {', '.join(METHODS)}")
        if method != "none" and not _positive(threshold):
            raise GradscopeError(f"clipping by {method} needs a positive threshold, got {threshold!r}",
                                 "pass the threshold of the recommendation")
        if safety_net is not None and not _positive(safety_net):
            raise GradscopeError(f"the safety net must be a positive norm, got {safety_net!r}",
                                 "pass the recommendation's evidence.safety_net, or None")
        if skip is not None and not isinstance(skip, Skip):
            raise GradscopeError(f"skip must be a gradscope.Skip, got {skip!r}", "pass skip=gradscope.Skip(z=6, window=128)")
        self.method, self.threshold, self.eps = method, threshold, eps
        self.safety_net = safety_net if method == "none" else None
        self.exclude = None if exclude is None else set(exclude)
        self.skip = skip
        self.adaptive = Adaptive(z=threshold, alpha=alpha, warmup=warmup) if method == "adaptive" else None
        self._guards: Optional[GuardState] = None
        self._skippers: List[StepSkipper] = []  # one per attached optimizer: the skip made exact
        self._pending_state: Optional[Mapping[str, torch.Tensor]] = None

    @classmethod
    def from_report(cls, report: Report, *, safety_net: bool = True, **options) -> "Clipper":
        """The recommendation as a Clipper. Where it is ``none``, the safety net it states (norm clipping
        at 10x the largest global norm profiled, which clipped no profiled step) is armed, so a blow-up
        after the profile is still caught; ``safety_net=False`` clips nothing. Where it arms the skip-step
        guard, so does the Clipper (``skip=None`` leaves it off)."""
        advice = report.recommendation
        net = advice.evidence.safety_net if safety_net else None
        if advice.guard is not None and advice.guard.armed:
            options.setdefault("skip", advice.guard.skip)
        return cls(advice.method, advice.threshold, safety_net=net, **options)

    @classmethod
    def from_json(cls, source: Union[str, Path, Mapping[str, Any]], *, safety_net: bool = True,
                  **options) -> "Clipper":
        """The advice of a gradscope JSON report (``Report.to_json()``, or the CLI's JSON format): a path
        to it, or the parsed document.
        A CI job can diagnose once and a training job apply the advice, with no Report object between."""
        advice = Report.from_json(source).recommendation
        evidence = advice.get("evidence") if isinstance(advice.get("evidence"), Mapping) else {}
        net = evidence.get("safety_net") if safety_net else None
        guard = advice.get("guard")
        if isinstance(guard, Mapping) and guard.get("kind") == "skip" and guard.get("armed", True):
            try:
                bounds = {k: cast(guard[k]) for k, cast in (("max_consecutive", int), ("max_rate", float)) if k in guard}
                skip = Skip(z=float(guard["z"]), window=int(guard["window"]), min_history=int(guard["min_history"]),
                            **bounds)
            except (KeyError, TypeError, ValueError, OverflowError):
                raise GradscopeError("the report's skip guard is malformed: it needs numbers z, window and "
                                     "min_history", WRITE_JSON_HINT, remedy=("write-json-report", "FILE")) from None
            options.setdefault("skip", skip)
        return cls(advice["method"], advice.get("threshold"), safety_net=net, **options)

    def __repr__(self) -> str:
        guard = "" if self.skip is None else f", skip={self.skip!r}"
        if self.method == "none":
            return f"Clipper('none', safety_net={self.safety_net!r}{guard})"
        return f"Clipper({self.method!r}, {self.threshold!r}{guard})"

    @property
    def guarded(self) -> bool:
        """Whether this Clipper keeps state across steps (a skip guard, or adaptive clipping)."""
        return self.skip is not None or self.adaptive is not None

    @torch.no_grad()
    def __call__(self, model: nn.Module, loss: Optional[torch.Tensor] = None) -> None:
        """Clip ``model``'s gradients in place. ``loss`` (this step's, a tensor) is what the skip guard
        also watches; other methods ignore it."""
        if self.guarded:
            self._guarded(model, loss)
        elif self.method == "norm":
            clip_norm_(model.parameters(), self.threshold)
        elif self.safety_net is not None:
            clip_norm_(model.parameters(), self.safety_net)
        elif self.method == "value":
            clip_value_(model.parameters(), self.threshold)
        elif self.method == "agc":
            for p in _agc_parameters(model, self.excluded(model)):
                _clip_unitwise(p, self.threshold, self.eps)

    def _guarded(self, model: nn.Module, loss: Optional[torch.Tensor]) -> None:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise GradscopeError("the skip guard and adaptive clipping need dense gradients",
                                 "clip sparse gradients by norm or value, without a guard")
        grads = [p.grad for p in params]
        plain = all(type(g) is torch.Tensor for g in grads)  # no DTensor shard among them
        norm = total_norm(grads, plain)
        if self._guards is None:
            self._guards = GuardState(self.skip, self.adaptive, norm.device)
            if self._pending_state is not None:
                self._guards.load_state_dict(self._pending_state)
                self._pending_state = None
        threshold = self.threshold if self.method == "norm" else self.safety_net if self.method == "none" else None
        factor, skip = self._guards.decide(norm, loss, threshold)
        for skipper in self._skippers:
            skipper.decide(skip)
        if self.method == "value":
            clip_value_(params, self.threshold)
        elif self.method == "agc":
            for p in _agc_parameters(model, self.excluded(model)):
                _clip_unitwise(p, self.threshold, self.eps)
        by_kind: Dict[tuple, List[torch.Tensor]] = {}
        for g in grads:
            local = g if plain else distributed.local(g)
            by_kind.setdefault((local.device, local.dtype), []).append(local)
        for (device, dtype), group in by_kind.items():  # one multiply per device and dtype: the scale, or 0
            torch._foreach_mul_(group, factor.to(device, dtype))

    def counts(self) -> Dict[str, Any]:
        """What the guards did so far: steps seen, skipped, and clipped (scaled down by the norm threshold, the
        safety net or the adaptive bound; value and AGC clipping are not counted), the mean scale of a
        clipped step, and the first events (step, norm, z, scale). One copy to the host; empty before the
        first guarded step."""
        if self._guards is None:
            return {}
        counts = self._guards.counts()
        if self.skip is not None:
            counts["skip_kind"] = ", ".join(s.kind for s in self._skippers) or "gradient zeroed"
        return counts

    def state_dict(self) -> Dict[str, Any]:
        """The guards' running statistics and counters, for a checkpoint (empty without a guard)."""
        if self._guards is not None:
            return self._guards.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if not self.guarded:
            raise GradscopeError("this Clipper has no guard to load a state into",
                                 "make it with the same skip= or adaptive method as the one that was saved")
        if self._guards is None:  # applied at the first step, once the device is known
            self._pending_state = dict(state)
        else:
            self._guards.load_state_dict(state)

    def attach(self, optimizer: torch.optim.Optimizer) -> "Clipper":
        """Carry this Clipper's state in ``optimizer.state_dict()`` (under ``"gradscope_clipper"``), and
        restore it on ``optimizer.load_state_dict()``: a run resumed from its optimizer checkpoint guards
        as the uninterrupted one would. With a skip guard, a step it skips is skipped by the optimizer
        too: weights, moments, weight decay and step count stay as they were (``gradscope.run.clipper.skipping``:
        through ``found_inf`` on torch's fused optimizers, by copying back elsewhere). Attach once."""
        if any(s.optimizer is optimizer for s in self._skippers):
            return self
        if self.skip is not None:
            self._skippers.append(StepSkipper(optimizer))
        def save(_optimizer, state):
            state[STATE_KEY] = self.state_dict()
            return state

        def load(_optimizer, state):
            if STATE_KEY in state:
                state = dict(state)
                self.load_state_dict(state.pop(STATE_KEY))
            return state
        optimizer.register_state_dict_post_hook(save)
        optimizer.register_load_state_dict_pre_hook(load)
        return self

    def excluded(self, model: nn.Module) -> Set[str]:
        """The modules of ``model`` whose parameters AGC leaves alone: ``exclude`` where given, else the
        last Linear (the classifier head, as timm excludes it). A Monitor watching this Clipper reads it."""
        if self.exclude is not None:
            return self.exclude
        last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        return set(last[-1:])


@torch.no_grad()
def clip_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, also where some gradients are sparse (an ``nn.Embedding(...,
    sparse=True)`` under SparseAdam), for which torch's raises: their coalesced values count in the global
    norm, and they are scaled with the rest. Dense gradients alone go to torch's own, unchanged."""
    params = [p for p in parameters if p.grad is not None]
    sparse = [p.grad for p in params if p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    dense = [p.grad for p in params if not p.grad.is_sparse]
    device = sparse[0].device
    norms = [torch.linalg.vector_norm(g.coalesce()._values().detach().float()) for g in sparse]
    norms += [torch.linalg.vector_norm(g.detach()).float().to(device) for g in dense]
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch's: 1e-6 keeps a zero gradient finite
    for g in (*dense, *sparse):
        g.mul_(scale.to(g.device))
    return total


@torch.no_grad()
def clip_value_(parameters: Iterable[torch.Tensor], clip_value: float) -> None:
    """``torch.nn.utils.clip_grad_value_``, also for sparse gradients (their values are capped) and complex
    ones, for which torch's raises: an element's modulus |g| is capped at ``clip_value`` and its phase kept,
    as the profile measures a complex gradient by its modulus."""
    params = [p for p in parameters if p.grad is not None]
    dense = [p for p in params if not p.grad.is_sparse and not p.grad.is_complex()]
    if dense:
        torch.nn.utils.clip_grad_value_(dense, clip_value)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            p.grad._values().clamp_(-clip_value, clip_value)
        elif p.grad.is_complex():
            p.grad.mul_((clip_value / p.grad.abs().clamp(min=1e-30)).clamp(max=1.0))


def _positive(value: Any) -> bool:
    """A finite positive real number (a bool or a string is not a threshold)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _agc_parameters(model: nn.Module, excluded: Set[str]) -> List[nn.Parameter]:
    params = []
    for name, module in model.named_modules():
        if name in excluded:
            continue
        params.extend(p for p in module.parameters(recurse=False) if p.grad is not None)
    return params


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """The norm of each output unit: the whole tensor for biases and gains, each row otherwise."""
    if x.ndim <= 1:
        return x.norm()
    return x.norm(dim=tuple(range(1, x.ndim)), keepdim=True)


def _clip_unitwise(p: nn.Parameter, clip_factor: float, eps: float) -> None:
    max_norm = _unitwise_norm(p.detach()).clamp(min=eps) * clip_factor
    grad_norm = _unitwise_norm(p.grad)
    scale = (max_norm / grad_norm.clamp(min=1e-6)).clamp(max=1.0)
    p.grad.mul_(scale)
