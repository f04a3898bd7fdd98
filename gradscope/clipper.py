"""Apply the advice: clip a model's gradients exactly as a Recommendation says (norm, value or AGC)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Set, Union

import torch
from torch import nn

from .errors import GradscopeError
from .report import Report

METHODS = ("norm", "value", "agc", "none")


class Clipper:
    """Clip gradients in place, between ``backward()`` and ``optimizer.step()``: ``clipper(model)``.

    ``norm`` and ``value`` call ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_``. ``agc`` is
    adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition
    Without Normalization"): each unit's gradient (a row of a weight, over all but its first dimension)
    is rescaled to at most ``threshold`` x max(‖unit weight‖, ``eps``). As in that paper, the final
    linear layer is left out unless ``exclude`` names other modules (``exclude=()`` clips every layer).
    ``none`` clips nothing unless ``safety_net`` is given: then the global norm is clipped at that
    generous threshold, which only a blow-up reaches.
    """

    def __init__(self, method: str, threshold: Optional[float], *, eps: float = 1e-3,
                 exclude: Optional[Iterable[str]] = None, safety_net: Optional[float] = None) -> None:
        if method not in METHODS:
            raise GradscopeError(f"unknown clipping method {method!r}", f"use one of {', '.join(METHODS)}")
        if method != "none" and not (threshold is not None and threshold > 0):
            raise GradscopeError(f"clipping by {method} needs a positive threshold, got {threshold!r}",
                                 "pass the threshold of the recommendation")
        if safety_net is not None and not safety_net > 0:
            raise GradscopeError(f"the safety net must be a positive norm, got {safety_net!r}",
                                 "pass the recommendation's evidence.safety_net, or None")
        self.method, self.threshold, self.eps = method, threshold, eps
        self.safety_net = safety_net if method == "none" else None
        self.exclude = None if exclude is None else set(exclude)

    @classmethod
    def from_report(cls, report: Report, *, safety_net: bool = True, **options) -> "Clipper":
        """The recommendation as a Clipper. Where it is ``none``, the safety net it states (norm clipping
        at 10x the largest global norm profiled, which clipped no profiled step) is armed, so a blow-up
        after the profile is still caught; ``safety_net=False`` clips nothing."""
        advice = report.recommendation
        net = advice.evidence.safety_net if safety_net else None
        return cls(advice.method, advice.threshold, safety_net=net, **options)

    @classmethod
    def from_json(cls, source: Union[str, Path, Mapping[str, Any]], *, safety_net: bool = True,
                  **options) -> "Clipper":
        """The advice of a report written with ``--format json``: a path to it, or the parsed document.
        A CI job can diagnose once and a training job apply the advice, with no Report object between."""
        doc = source
        if not isinstance(source, Mapping):
            path = Path(source)
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise GradscopeError(f"cannot read a gradscope report from {path}: {exc}",
                                     "write one with: gradscope diagnose TARGET --format json --output FILE") from None
        advice = doc.get("recommendation") if isinstance(doc, Mapping) else None
        if not isinstance(advice, Mapping) or advice.get("method") not in METHODS:
            raise GradscopeError("not a gradscope JSON report: no recommendation with a known method",
                                 "write one with: gradscope diagnose TARGET --format json --output FILE")
        evidence = advice.get("evidence") if isinstance(advice.get("evidence"), Mapping) else {}
        net = evidence.get("safety_net") if safety_net else None
        return cls(advice["method"], advice.get("threshold"), safety_net=net, **options)

    def __repr__(self) -> str:
        if self.method == "none":
            return f"Clipper('none', safety_net={self.safety_net!r})"
        return f"Clipper({self.method!r}, {self.threshold!r})"

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        if self.method == "norm":
            clip_norm_(model.parameters(), self.threshold)
        elif self.safety_net is not None:
            clip_norm_(model.parameters(), self.safety_net)
        elif self.method == "value":
            clip_value_(model.parameters(), self.threshold)
        elif self.method == "agc":
            for p in _agc_parameters(model, self._excluded(model)):
                _clip_unitwise(p, self.threshold, self.eps)

    def _excluded(self, model: nn.Module) -> Set[str]:
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
    """``torch.nn.utils.clip_grad_value_``, also for sparse gradients (their values are capped)."""
    params = [p for p in parameters if p.grad is not None]
    dense = [p for p in params if not p.grad.is_sparse]
    if dense:
        torch.nn.utils.clip_grad_value_(dense, clip_value)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            p.grad._values().clamp_(-clip_value, clip_value)


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
